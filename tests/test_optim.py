"""certnet.optim against torch.optim: the same parameters and state, bit for bit, at every step;
state saved by either resumes identically; the Trainer never imports torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from certnet.errors import ConfigError
from certnet.optim import SGD, Adam


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 3, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [conv, torch.randn(5, 7, generator=g), torch.randn(7, generator=g),
            torch.randn((), generator=g)]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g) * 10.0 ** (i - 2) for i, p in enumerate(params)]
    if step % 3 == 2:  # a parameter without a gradient this step keeps its state
        grads[1] = None
    return grads


def _groups(params: list[torch.Tensor], split: bool) -> list[dict] | list[torch.Tensor]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.3}] if split else params


def _run(make, steps: int, optimizer=None, params=None, start: int = 0):
    params = params if params is not None else [p.clone().requires_grad_() for p in _params()]
    optimizer = optimizer or make(params)
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        optimizer.step()
    return params, optimizer


ADAM = [{}, {"weight_decay": 0.1}, {"betas": (0.8, 0.99), "eps": 1e-10}, {"amsgrad": True},
        {"maximize": True, "weight_decay": 0.01}]
SGDS = [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"momentum": 0.5, "dampening": 0.3}, {"maximize": True, "momentum": 0.9}]
CASES = [(Adam, torch.optim.Adam, kw) for kw in ADAM] + \
    [(SGD, torch.optim.SGD, kw) for kw in SGDS]


def _same_state(ours, theirs) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for idx, entries in b["state"].items():
        assert entries.keys() == a["state"][idx].keys()
        for name, value in entries.items():
            assert torch.equal(a["state"][idx][name], value), (idx, name)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("ours", "reference", "kwargs"), CASES)
def test_bitwise_equal_to_torch_optim(ours, reference, kwargs, split):
    mine, mine_opt = _run(lambda p: ours(_groups(p, split), lr=0.05, **kwargs), 12)
    theirs, their_opt = _run(lambda p: reference(_groups(p, split), lr=0.05, **kwargs), 12)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b)
    _same_state(mine_opt, their_opt)


@pytest.mark.parametrize(("ours", "reference", "kwargs"), CASES)
def test_resumes_from_own_and_torch_state(ours, reference, kwargs):
    """5 steps, state_dict (of certnet.optim or of torch.optim, as earlier checkpoints hold),
    load into a fresh optimizer, 7 more steps: the same as 12 steps in one go."""
    straight, _ = _run(lambda p: ours(p, lr=0.05, **kwargs), 12)
    for maker in (ours, reference):
        params, first = _run(lambda p, maker=maker: maker(p, lr=0.05, **kwargs), 5)
        resumed = ours([p.detach().clone().requires_grad_() for p in params], lr=0.05, **kwargs)
        resumed.load_state_dict(first.state_dict())
        fresh = [p for g in resumed.param_groups for p in g["params"]]
        done, _ = _run(None, 7, optimizer=resumed, params=fresh, start=5)
        for a, b in zip(done, straight, strict=True):
            assert torch.equal(a, b), maker


def test_state_dict_layout_and_hyperparameters_restored():
    params, opt = _run(lambda p: Adam(_groups(p, True), lr=0.05), 3)
    saved = opt.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3]]
    assert saved["state"][0]["step"].dtype == torch.float32
    fresh = Adam(_groups([p.detach().clone() for p in params], True), lr=1.0)
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [0.05, 0.3]


def test_bad_states_and_settings_are_clear_errors():
    params, opt = _run(lambda p: Adam(p), 1)
    other = Adam(_groups([p.detach().clone() for p in params], True))
    with pytest.raises(ConfigError, match="parameter groups"):
        other.load_state_dict(opt.state_dict())
    saved = opt.state_dict()
    saved["state"][9] = saved["state"][0]
    with pytest.raises(ConfigError, match="parameter 9"):
        Adam([p.detach().clone() for p in params]).load_state_dict(saved)
    with pytest.raises(ConfigError, match="empty"):
        Adam([])
    with pytest.raises(ConfigError, match="more than one place"):
        Adam([params[0], params[0]])
    with pytest.raises(ConfigError, match="betas"):
        Adam(params, betas=(1.0, 0.9))
    with pytest.raises(ConfigError, match="Nesterov"):
        SGD(params, nesterov=True)
    with pytest.raises(ConfigError, match="learning rate"):
        SGD(params, lr=-1.0)


def test_zero_grad():
    p = torch.ones(3, requires_grad=True)
    p.grad = torch.ones(3)
    SGD([p]).zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))
    SGD([p]).zero_grad()
    assert p.grad is None


def test_training_does_not_import_dynamo(tmp_path, mnist_available):
    """The optimizer was the only reason a training process imported torch._dynamo (~0.85 s
    of start-up): a short run of the Trainer leaves it unimported."""
    code = f"""
import sys
from certnet.train import TrainConfig, Trainer
config = TrainConfig(epochs=1, train_limit=256, eval_limit=128, batch_size=128, eps=0.3)
Trainer(config, {str(tmp_path / 'run')!r}, progress=False).fit()
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

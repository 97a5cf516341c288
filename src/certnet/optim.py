"""Adam and SGD with torch.optim's arithmetic, without torch.optim.

Constructing any torch.optim optimizer imports torch._dynamo (``Optimizer.__init__`` and
``step`` go through ``torch._disable_dynamo``): ~0.85 s per training process here, 5% of the
README's quick-start job (benchmarks/whole_job.py). These two classes compute exactly what
torch.optim's do, operation for operation: Adam as ``torch.optim.Adam`` (Kingma & Ba 2015,
Alg. 1, with its bias corrections; L2 weight decay added to the gradient; AMSGrad, Reddi et al.
2018), SGD with momentum, dampening and Nesterov as ``torch.optim.SGD`` (Sutskever et al.
2013). tests/test_optim.py checks every state bit for bit against torch.optim, and that a
state saved by torch.optim (the checkpoints of earlier runs) resumes identically.

Their ``state_dict`` has torch.optim's layout, and ``param_groups`` / ``step`` / ``zero_grad``
are what torch.amp.GradScaler and the Trainer use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from certnet.errors import ConfigError

ParamsOrGroups = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class Optimizer:
    """Parameter groups, state and (de)serialisation; subclasses compute ``_update``."""

    #: hyperparameters of a group and their defaults (set by each subclass's ``__init__``)
    defaults: dict[str, Any]
    #: per-parameter state entries that stay float32 scalars on the CPU, as torch.optim keeps them
    scalar_state: tuple[str, ...] = ()

    def __init__(self, params: ParamsOrGroups, defaults: dict[str, Any]) -> None:
        if defaults["lr"] < 0:
            raise ConfigError(f"the learning rate must be >= 0, got {defaults['lr']}")
        self.defaults = defaults
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ConfigError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict[str, Any]) -> None:
        params = list(group["params"])
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or seen & {id(p) for p in params}:
            raise ConfigError("a parameter appears in more than one place of the optimizer")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                if group["maximize"]:
                    grads = torch._foreach_neg(grads)
                self._update(group, params, grads)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor],
                grads: list[torch.Tensor]) -> None:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: state by parameter index, groups with ``params`` as indices."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            groups.append({**group, "params": [index[id(p)] for p in group["params"]]})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` or from torch.optim's optimizer of the same
        kind (its extra group keys such as ``foreach`` are ignored)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups, strict=True)):
            raise ConfigError("the saved optimizer state has other parameter groups than the "
                              "model's")
        params = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            params.update(zip(saved["params"], group["params"], strict=True))
            group.update({k: saved[k] for k in group if k != "params" and k in saved})
        self.state = {}
        for idx, entries in state_dict["state"].items():
            if int(idx) not in params:
                raise ConfigError(f"the saved optimizer state names parameter {idx}, which the "
                                  "model does not have")
            p = params[int(idx)]
            self.state[p] = {
                name: (torch.as_tensor(value, dtype=torch.float32).clone()
                       if name in self.scalar_state else
                       torch.as_tensor(value).to(device=p.device, dtype=p.dtype, copy=True))
                for name, value in entries.items()}


class Adam(Optimizer):
    """``torch.optim.Adam`` (L2 weight decay on the gradient, optional AMSGrad / maximize)."""

    scalar_state = ("step",)

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps < 0 or weight_decay < 0:
            raise ConfigError(f"Adam needs betas in [0, 1) and eps, weight_decay >= 0; got "
                              f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay, "amsgrad": amsgrad,
                                  "maximize": maximize})

    def _update(self, group, params, grads):
        beta1, beta2 = group["betas"]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        states = []
        for p in params:
            if p not in self.state:
                moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if group["amsgrad"] else 2]
                self.state[p] = {"step": torch.tensor(0.0), **{
                    k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in moments}}
            states.append(self.state[p])
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        steps = [s["step"].item() for s in states]
        step_sizes = [-(group["lr"] / (1 - beta1**t)) for t in steps]
        if group["amsgrad"]:
            maxima = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(maxima, exp_avg_sqs)
            exp_avg_sqs = maxima
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)


class SGD(Optimizer):
    """``torch.optim.SGD`` (momentum buffer started at the first gradient)."""

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False) -> None:
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"SGD needs momentum, weight_decay >= 0; got momentum={momentum}, "
                              f"weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("Nesterov momentum needs momentum > 0 and dampening 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov,
                                  "maximize": maximize})

    def _update(self, group, params, grads):
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            bufs = []
            for p, g in zip(params, grads, strict=True):
                if "momentum_buffer" in self.state.get(p, {}):
                    buf = self.state[p]["momentum_buffer"]
                    buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
                else:
                    buf = self.state.setdefault(p, {})["momentum_buffer"] = g.detach().clone()
                bufs.append(buf)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] \
                else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


OPTIMIZERS: dict[str, type[Optimizer]] = {"adam": Adam, "sgd": SGD}

"""A toy method goes train -> checkpoint -> load -> certify through every seam a new method uses:
its own method class, architecture, initialisation, certifier, loss schedule, progress hook and
optimizer settings, and the shared certifiers. If a future change breaks the contract, this
fails, not the next method."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certnet
import certnet.optim
from certnet.archs import ARCHS, INITS, register_arch
from certnet.certifiers import CERTIFIERS, Certificate, Certifier, register_certifier
from certnet.cli import main
from certnet.methods import METHODS, CertifiedModel, register_method
from certnet.threat import ThreatModel, norm_of
from certnet.train import TrainConfig, Trainer, build_model


class ToyLinear(CertifiedModel):
    """Flatten + one linear layer, trained on its exact worst-case logits."""

    method = "toy-linear"
    norm = "linf"
    init = "toy-zero"
    default_certifier = "toy-exact"

    def __init__(self, layers: nn.Sequential, input_shape, num_classes, temperature: float = 1.0):
        super().__init__(input_shape, num_classes)
        self.layers = layers
        self.temperature = temperature
        self.progress_seen: list[float] = []

    def forward(self, x):
        return self.layers(x)

    def on_progress(self, progress: float) -> None:
        self.progress_seen.append(progress)

    def method_config(self):
        return {"temperature": self.temperature}

    def loss(self, x, y, eps, weight: float = 1.0):
        logits = self(x)
        w = self.layers[-1].weight
        diff = norm_of((w.unsqueeze(0) - w[y].unsqueeze(1)).flatten(0, 1).unsqueeze(1), "l1")
        worst = logits + eps * diff.view(len(y), -1)
        loss = F.cross_entropy(logits / self.temperature, y) + \
            weight * F.cross_entropy(worst, y)
        with torch.no_grad():
            robust = worst.argmax(1) == y
        return loss, {"clean": logits.argmax(1) == y, "robust": robust}


class ToyExact(Certifier):
    """Exact margins of a linear model over the l_inf ball (the pixel box ignored: sound)."""

    name = "toy-exact"
    gives_radius = True
    cost = 0

    def applies(self, model, norm):
        return None if type(model) is ToyLinear else "only for toy-linear models"

    @torch.no_grad()
    def certify(self, model, x, threat: ThreatModel) -> Certificate:
        layers = model.float64_copy("toy-exact", lambda layers: None).layers
        logits = layers(x.double())
        pred = logits.argmax(1)
        w = layers[-1].weight.detach()
        diff = w[pred].unsqueeze(1) - w.unsqueeze(0)  # (B, K, D)
        gap = logits.gather(1, pred[:, None]) - logits
        dual = diff.abs().sum(-1) if threat.norm == "linf" else diff.norm(dim=-1)
        radius = torch.where(dual > 0, gap / dual, torch.inf).amin(1) * (1 - 1e-9)
        radius = torch.where(radius == torch.inf, torch.zeros_like(radius), radius)
        return Certificate(pred=pred, certified=radius > threat.eps, radius=radius.float())


def toy_arch(input_shape, num_classes):
    features = int(torch.tensor(input_shape).prod())
    return [{"type": "flatten"}, {"type": "linear", "in_features": features,
                                  "out_features": num_classes, "bias": True}]


def _zero_init(layers):
    for m in layers:
        if hasattr(m, "weight"):
            nn.init.zeros_(m.weight)


@pytest.fixture
def toy_method():
    register_method(ToyLinear)
    register_certifier(ToyExact())
    INITS["toy-zero"] = _zero_init
    yield
    METHODS.pop("toy-linear")
    CERTIFIERS.pop("toy-exact")
    INITS.pop("toy-zero")


@pytest.fixture
def toy_arch_registered(toy_method):
    register_arch("toy-flat-linear")(toy_arch)
    yield
    ARCHS.pop("toy-flat-linear")


def _config(**kw):
    return TrainConfig(**{**dict(
        method="toy-linear", arch="toy-flat-linear", dataset="mnist", eps=0.02, epochs=2,
        batch_size=128, train_limit=512, eval_limit=128, lr=0.05, optimizer="sgd",
        optimizer_kwargs={"momentum": 0.9}, grad_clip=1.0, method_kwargs={"temperature": 2.0},
        loss_schedules={"weight": {"start": 0.0, "end": 1.0, "shape": "linear"}}), **kw})


def test_toy_method_goes_through_every_seam(tmp_path, mnist_available, toy_arch_registered):
    config = _config()
    fresh = build_model(config, (1, 28, 28), 10)
    assert all(float(p.detach().abs().max()) == 0 for n, p in fresh.named_parameters()
               if n.endswith("weight"))  # the method's own init was used
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert type(trainer.optimizer) is certnet.optim.SGD
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    trainer.fit()
    seen = trainer.model.progress_seen
    assert len(seen) == 8 and seen == sorted(seen) and 0 <= seen[0] and seen[-1] < 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["weight"] for m in metrics] == sorted(m["weight"] for m in metrics)
    assert {"test_clean", "test_vra", "test_abstain"} <= set(metrics[-1])

    model = certnet.load(tmp_path / "run")
    assert type(model) is ToyLinear and model.temperature == 2.0
    x = trainer.test_data.images(slice(128))
    y = trainer.test_data.y[:128]
    before = trainer.model.eval().certify(x, 0.02)
    after = model.certify(x, 0.02)
    assert torch.equal(before.pred, after.pred) and torch.equal(before.certified,
                                                                after.certified)
    assert (model(x).argmax(1) == y).float().mean() > 0.5
    # the shared certifiers apply too: on an affine model IBP (the last layer folded into the
    # margins) and CROWN are exact over the ball clipped to the pixel box, so they agree and
    # certify at least what the toy certifier (which ignores the box) certifies
    ibp = model.certify(x, 0.02, certifier="ibp")
    assert ibp.certified.sum() > after.certified.sum() > 0
    assert not (after.certified & ~ibp.certified).any()
    for name in ("crown-ibp", "crown", "best"):
        other = model.certify(x, 0.02, certifier=name)
        assert torch.equal(other.pred, after.pred)
        assert torch.equal(other.certified, ibp.certified | after.certified), name
    assert model.certify(x, 0.5, norm="l2", certifier="lipschitz").certified.any()


def test_toy_method_from_the_cli(tmp_path, mnist_available, toy_arch_registered, capsys):
    Trainer(_config(epochs=1), tmp_path / "run", progress=False).fit()
    out = tmp_path / "certify.json"
    assert main(["certify", str(tmp_path / "run"), "--limit", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["certifier"] == "toy-exact" and result["norm"] == "linf"
    assert main(["certify", str(tmp_path / "run"), "--limit", "64", "--certifier", "best",
                 "--norm", "l2", "--eps", "0.1"]) == 0
    assert main(["certify", str(tmp_path / "run"), "--limit", "8", "--certifier",
                 "no-such"]) == 2
    assert "unknown certifier" in capsys.readouterr().err

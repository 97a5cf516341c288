"""The certification engine shared by all methods: batched sound certificates, clean accuracy,
VRA (verified-robust accuracy), abstention rate, radius quantiles, certified-accuracy curves."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, overload

import torch
from tqdm import tqdm

from certnet.certifiers.base import resolve, run
from certnet.checkpoint import atomic_write
from certnet.data import Dataset
from certnet.distributed import World
from certnet.errors import InputError
from certnet.methods.base import CertifiedModel
from certnet.threat import ThreatModel, check_eps, check_inputs


@dataclass
class Report:
    """Outcome of certifying a dataset; ``to_dict`` is the ``--json`` payload."""

    method: str
    certifier: str
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    vra: float
    abstain_rate: float
    seconds: float
    radius_quantiles: dict[str, float]
    gives_radius: bool
    certified_by: dict[str, int]
    labels: torch.Tensor = field(repr=False)
    pred: torch.Tensor = field(repr=False)
    certified: torch.Tensor = field(repr=False)
    radius: torch.Tensor = field(repr=False)
    by: list[str] = field(repr=False)

    @property
    def points_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "certifier": self.certifier, "norm": self.norm,
                "eps": self.eps, "n": self.n, "clean_accuracy": self.clean_accuracy,
                "vra": self.vra, "abstain_rate": self.abstain_rate, "seconds": self.seconds,
                "points_per_second": self.points_per_second, "gives_radius": self.gives_radius,
                "certified_by": self.certified_by,
                "radius_quantiles": self.radius_quantiles if self.gives_radius else None}

    def summary(self) -> str:
        q = self.radius_quantiles
        radii = (f"radius p10/p50/p90 {_down(q['p10'])}/{_down(q['p50'])}/{_down(q['p90'])}"
                 if self.gives_radius else "radius: eps or nothing")
        by = ""
        if len(self.certified_by) > 1:
            by = "  certified by " + ", ".join(f"{k} {v}" for k, v in self.certified_by.items())
        return (f"{self.method}/{self.certifier} {self.norm} eps={self.eps:g} n={self.n}: "
                f"clean accuracy {100 * self.clean_accuracy:.2f}%  VRA {100 * self.vra:.2f}%  "
                f"abstain {100 * self.abstain_rate:.2f}%  {radii}{by}  "
                f"{self.points_per_second:.3g} points/s")

    def write_per_point(self, path: str | Path) -> None:
        rows = [["index", "label", "pred", "certified", "radius", "certifier"]]
        for i, (lab, p, c, r, b) in enumerate(zip(self.labels.tolist(), self.pred.tolist(),
                                                  self.certified.tolist(),
                                                  self.radius.tolist(), self.by, strict=True)):
            rows.append([i, lab, p, int(c), repr(r), b])  # exact: never rounded up
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        atomic_write(path, buffer.getvalue())

    def curve(self, eps_grid: torch.Tensor) -> torch.Tensor:
        """Certified accuracy at each radius in ``eps_grid`` (fraction correct with radius > e)."""
        correct = self.pred == self.labels
        return torch.stack([((self.radius > e) & correct).float().mean() for e in eps_grid])

    def plot_curve(self, path: str | Path, max_eps: float | None = None) -> bool:
        """Certified accuracy against radius as a PNG; only for certifiers that compute radii
        (returns False, writing nothing, for "eps or nothing" certificates)."""
        if not self.gives_radius:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        top = max_eps or max(2 * self.eps, self.radius_quantiles["p90"], 1e-3)
        grid = torch.linspace(0, top, 200)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(grid.numpy(), 100 * self.curve(grid).numpy(), label=self.certifier)
        ax.axvline(self.eps, color="gray", ls="--", lw=0.8, label=f"eps={self.eps:g}")
        ax.set_xlabel(f"radius ({self.norm})")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = Path(path).with_suffix(".tmp" + Path(path).suffix)
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        return True


@overload
def evaluate(model: CertifiedModel, data: Dataset, eps: float, certifier: str | None = None,
             batch_size: int = 2000, norm: str | None = None, world: World | None = None,
             progress: bool = False) -> Report: ...


@overload
def evaluate(model: CertifiedModel, data: Dataset, eps: Sequence[float],
             certifier: str | None = None, batch_size: int = 2000, norm: str | None = None,
             world: World | None = None, progress: bool = False) -> list[Report]: ...


def evaluate(model: CertifiedModel, data: Dataset, eps: float | Sequence[float],
             certifier: str | None = None, batch_size: int = 2000, norm: str | None = None,
             world: World | None = None, progress: bool = False) -> Report | list[Report]:
    """Certify every point of ``data`` at radius ``eps`` (a :class:`Report`), or at each radius
    of a sequence in one pass over the data (a list of Reports in the same order), by
    ``certifier`` in ``norm`` (defaults: the model's), resolved once. Each batch is checked once
    and certified once per radius;
    a report's ``seconds`` counts its own certify calls. With a distributed ``world`` each rank
    certifies its contiguous share of the points and every rank gets the whole report (the
    same per-point results as one process; ``seconds`` is the slowest rank's). ``progress``: a
    tqdm bar of points with its ETA, on a terminal only."""
    single = isinstance(eps, (int, float))
    radii = [eps] if single else list(eps)
    if not radii:
        raise InputError("no epsilon to certify at")
    for e in radii:
        check_eps(e)
    device = next(model.parameters()).device
    chosen, norm = resolve(model, certifier, norm)
    was_training = model.training
    model.eval()
    outcomes = [{"pred": [], "certified": [], "radius": [], "by": [], "seconds": 0.0,
                 "gives_radius": chosen.gives_radius} for _ in radii]
    world = world or World()
    share = world.shard(data.y)
    bar = tqdm(total=share.stop - share.start, unit="pt", leave=False,
               desc=f"certify {chosen.name} {norm}", disable=None if progress else True)
    for i in range(share.start, share.stop, batch_size):
        x = data.images(slice(i, min(i + batch_size, share.stop))).to(device)
        check_inputs(x, model.input_shape)
        for e, out in zip(radii, outcomes, strict=True):
            start = time.perf_counter()
            cert = run(chosen, model, x, ThreatModel(norm, float(e)))
            out["gives_radius"] &= cert.gives_radius
            out["by"] += cert.by
            out["pred"].append(cert.pred.cpu())
            out["certified"].append(cert.certified.cpu())
            out["radius"].append(cert.radius.cpu())
            out["seconds"] += time.perf_counter() - start
        bar.update(len(x))
    bar.close()
    model.train(was_training)
    if world.active:
        outcomes = [_merge(parts) for parts in zip(*world.gather(outcomes), strict=True)]
    reports = [_report(model, chosen.name, norm, e, data.y, out)
               for e, out in zip(radii, outcomes, strict=True)]
    return reports[0] if single else reports


def _merge(parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One outcome from the ranks' outcomes for the same radius, in rank order."""
    return {"pred": [t for p in parts for t in p["pred"]],
            "certified": [t for p in parts for t in p["certified"]],
            "radius": [t for p in parts for t in p["radius"]],
            "by": [b for p in parts for b in p["by"]],
            "seconds": max(p["seconds"] for p in parts),
            "gives_radius": all(p["gives_radius"] for p in parts)}


def _report(model: CertifiedModel, certifier: str, norm: str, eps: float,
            labels: torch.Tensor, outcome: dict[str, Any]) -> Report:
    pred, certified = torch.cat(outcome["pred"]), torch.cat(outcome["certified"])
    radius = torch.cat(outcome["radius"])
    correct = pred == labels
    finite = radius.clamp_max(torch.finfo(radius.dtype).max)
    # "lower": each quantile is a radius some point was proved, not an interpolation above it
    q = torch.quantile(finite.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
                       interpolation="lower")
    by = outcome["by"]
    counts = dict(Counter(name for name in by if name))
    return Report(
        method=model.method, certifier=certifier, norm=norm, eps=float(eps),
        n=len(labels), clean_accuracy=float(correct.float().mean()),
        vra=float((correct & certified).float().mean()),
        abstain_rate=float((~certified).float().mean()), seconds=outcome["seconds"],
        radius_quantiles={"p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])},
        gives_radius=outcome["gives_radius"], certified_by=counts,
        labels=labels.clone(), pred=pred, certified=certified, radius=radius, by=by)


#: Fields that several radii share in :func:`reports_to_dict`.
SHARED_FIELDS = ("method", "certifier", "norm", "n")


def reports_to_dict(reports: Sequence[Report]) -> dict[str, Any]:
    """The JSON payload of several radii: the shared fields once, total ``seconds``, and one
    entry per radius under ``results``."""
    first = reports[0].to_dict()
    return {**{k: first[k] for k in SHARED_FIELDS},
            "seconds": sum(r.seconds for r in reports),
            "results": [{k: v for k, v in r.to_dict().items() if k not in SHARED_FIELDS}
                        for r in reports]}


def summary_table(reports: Sequence[Report]) -> str:
    """One row per radius: eps, clean accuracy, VRA, abstain rate (percent)."""
    first = reports[0]
    seconds = sum(r.seconds for r in reports)
    lines = [f"{first.method}/{first.certifier} {first.norm} n={first.n}, "
             f"{len(reports)} radii in {seconds:.2f} s",
             f"{'eps':>8}  {'clean %':>8}  {'VRA %':>8}  {'abstain %':>9}"]
    lines += [f"{r.eps:>8g}  {100 * r.clean_accuracy:>8.2f}  {100 * r.vra:>8.2f}  "
              f"{100 * r.abstain_rate:>9.2f}" for r in reports]
    return "\n".join(lines)


def _down(radius: float) -> str:
    """``radius`` to 3 decimals, rounded down (a printed radius is never more than proved)."""
    return str(Decimal(radius).quantize(Decimal("0.001"), rounding=ROUND_FLOOR))

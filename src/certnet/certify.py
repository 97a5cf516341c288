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
from typing import TYPE_CHECKING, Any, overload

import torch
from tqdm import tqdm

from certnet.certifiers.base import resolve, run
from certnet.checkpoint import atomic_write
from certnet.data import Dataset
from certnet.distributed import World
from certnet.errors import InputError
from certnet.methods.base import CertifiedModel
from certnet.threat import ThreatModel, check_eps, check_inputs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
        by = "  certified by " + ", ".join(f"{k} {v}" for k, v in self.certified_by.items()) \
            if len(self.certified_by) > 1 else ""
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


#: The formats :func:`plot_curve` writes, named by the path's suffix.
CURVE_FORMATS = ("png", "pdf", "svg")
#: The x label's symbol for each norm (matplotlib mathtext).
NORM_SYMBOLS = {"l2": r"\ell_2", "linf": r"\ell_\infty"}


def certified_curve(report: Report) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact certified accuracy against radius, a step function: ``(radius, accuracy)``
    with ``accuracy[i]`` the fraction of points correct with a proved radius > r for every r in
    ``[radius[i], radius[i + 1])``. It starts at radius 0 and ends at the largest finite radius
    proved for a correct point, where it is 0 (unless some radius is infinite)."""
    correct = report.pred == report.labels
    proved = report.radius[correct].double().sort().values
    steps = torch.unique(proved[torch.isfinite(proved) & (proved > 0)])
    radius = torch.cat([proved.new_zeros(1), steps])
    beyond = len(proved) - torch.searchsorted(proved, radius, right=True)
    return radius, beyond.double() / report.n


def curve_figure(reports: Sequence[Report], name: str = "") -> Figure:
    """The figure :func:`plot_curve` writes (its first report must give radii)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = reports[0]
    radius, accuracy = certified_curve(first)
    fig = Figure(figsize=(5, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.step(radius.numpy(), 100 * accuracy.numpy(), where="post", lw=1.6,
            label=f"{first.method}, {first.certifier} certificate (n = {first.n})")
    for i, report in enumerate(reports):
        ax.plot(report.eps, 100 * report.vra, "o", color="C3", ms=5, zorder=3,
                label="VRA at the requested $\\varepsilon$" if i == 0 else "_nolegend_")
        ax.annotate(f"{100 * report.vra:.2f}% at $\\varepsilon$ = {report.eps:g}",
                    (report.eps, 100 * report.vra), xytext=(6, 5),
                    textcoords="offset points", fontsize=8)
    top = max(float(radius[-1]), *(r.eps for r in reports))
    ax.set_xlim(0, 1.05 * top if top > 0 else 1e-3)
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"${NORM_SYMBOLS.get(first.norm, first.norm)}$ radius $\\varepsilon$")
    ax.set_ylabel("certified accuracy (%)")
    if name:
        ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_curve(reports: Sequence[Report], path: str | Path, name: str = "") -> bool:
    """Certified accuracy against radius (:func:`certified_curve` of the first report), each
    report's eps marked with its VRA, titled ``name`` (e.g. the model's); written atomically in
    the format of the path's suffix (:data:`CURVE_FORMATS`). Only for certifiers that compute
    radii: returns False, writing nothing, for "eps or nothing" certificates."""
    fmt = Path(path).suffix[1:].lower()
    if fmt not in CURVE_FORMATS:
        raise InputError(f"--curve {path}: the suffix must be one of "
                         f"{', '.join('.' + f for f in CURVE_FORMATS)}")
    if not reports[0].gives_radius:
        return False
    buffer = io.BytesIO()
    curve_figure(reports, name).savefig(buffer, format=fmt, dpi=150)
    atomic_write(path, buffer.getvalue())
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
    and certified once per radius; a report's ``seconds`` counts its own certify calls. With a
    distributed ``world`` each rank certifies its contiguous share of the points and every rank
    gets the whole report (the same per-point results as one process; ``seconds`` is the
    slowest rank's). ``progress``: a tqdm bar of points with its ETA, on a terminal only."""
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
            for key in ("pred", "certified", "radius"):
                out[key].append(getattr(cert, key).cpu())
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
    return {**{k: [t for p in parts for t in p[k]] for k in ("pred", "certified", "radius", "by")},
            "seconds": max(p["seconds"] for p in parts),
            "gives_radius": all(p["gives_radius"] for p in parts)}


def _report(model: CertifiedModel, certifier: str, norm: str, eps: float,
            labels: torch.Tensor, outcome: dict[str, Any]) -> Report:
    pred, certified, radius = (torch.cat(outcome[k]) for k in ("pred", "certified", "radius"))
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

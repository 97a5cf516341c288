"""`certnet certify --curve`: the exact certified-accuracy curve down to 0, every --eps marked
with the VRA the table printed, the model and certifier named, the norm's symbol on the x axis,
the format from the suffix (png, pdf, svg) and any other suffix refused before certifying."""

import re

import pytest
import torch

import certnet
from certnet.archs import build_arch
from certnet.certify import CURVE_FORMATS, Report, certified_curve, curve_figure
from certnet.cli import OUTPUT_SUFFIXES, main
from certnet.methods.gloro import GloroNet

SHAPE = (1, 28, 28)
EPS = (0.01, 0.02, 0.05)


def _report(radius: list[float], pred: list[int], norm: str = "l2") -> Report:
    n = len(radius)
    radius_t, pred_t = torch.tensor(radius, dtype=torch.float64), torch.tensor(pred)
    labels = torch.zeros(n, dtype=torch.long)
    return Report(method="gloro", certifier="lipschitz", norm=norm, eps=0.3, n=n,
                  clean_accuracy=0.0, vra=0.0, abstain_rate=0.0, seconds=1.0,
                  radius_quantiles={}, gives_radius=True, certified_by={}, labels=labels,
                  pred=pred_t, certified=radius_t > 0.3, radius=radius_t, by=[""] * n)


def test_curve_is_the_exact_step_function_down_to_zero():
    # correct points' radii 0.2, 0.2, 0.5 (and one of 0); the wrong point's 0.9 never counts
    radius, accuracy = certified_curve(_report([0.5, 0.2, 0.2, 0.0, 0.9], [0, 0, 0, 0, 1]))
    assert radius.tolist() == [0.0, 0.2, 0.5]
    assert accuracy.tolist() == [3 / 5, 1 / 5, 0.0]


def test_an_infinite_radius_keeps_the_curve_above_zero():
    radius, accuracy = certified_curve(_report([float("inf"), 0.4], [0, 0]))
    assert radius.tolist() == [0.0, 0.4] and accuracy.tolist() == [1.0, 0.5]


@pytest.mark.parametrize("norm, symbol", [("l2", r"$\ell_2$"), ("linf", r"$\ell_\infty$")])
def test_x_label_names_the_norm(norm, symbol):
    ax = curve_figure([_report([0.1, 0.2], [0, 0], norm)]).axes[0]
    assert ax.get_xlabel() == f"{symbol} radius $\\varepsilon$"


def test_the_cli_and_the_plot_know_the_same_formats():
    assert OUTPUT_SUFFIXES["curve"] == tuple(f".{f}" for f in CURVE_FORMATS)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "my-model"
    model = GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10)
    certnet.save_model(path, model, eps=0.3, dataset="mnist")
    return path


def test_every_eps_is_marked_with_the_printed_vra(checkpoint, tmp_path, monkeypatch, capsys,
                                                  mnist_available):
    figures = []

    def keep(*args, **kwargs):
        figures.append(curve_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr("certnet.certify.curve_figure", keep)
    path = tmp_path / "c.png"
    assert main(["certify", str(checkpoint), "--limit", "200", "--eps",
                 ",".join(map(str, EPS)), "--curve", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if re.match(r"\s+\d", line)]
    printed = {float(row[0]): row[2] for row in rows}  # eps -> VRA % as printed
    assert sorted(printed) == list(EPS)
    (ax,) = figures[0].axes
    assert ax.get_title() == "my-model"
    curve, *marks = ax.get_lines()
    assert "lipschitz" in curve.get_label() and "gloro" in curve.get_label()
    assert [line.get_label() for line in ax.get_legend().get_lines()] == [
        curve.get_label(), marks[0].get_label()]
    x, y = curve.get_xdata(), curve.get_ydata()
    assert y[0] > 0 and y[-1] == 0 and x[-1] > 0  # down to 0, at the largest radius
    assert ax.get_xlim()[1] >= x[-1]
    assert [(m.get_xdata()[0], f"{m.get_ydata()[0]:.2f}") for m in marks] == list(
        printed.items())
    notes = [t.get_text() for t in ax.texts]
    assert notes == [f"{printed[e]}% at $\\varepsilon$ = {e:g}" for e in EPS]
    for e in EPS:  # each mark lies on the curve: certified accuracy just above eps
        assert f"{y[(x <= e).nonzero()[0][-1]]:.2f}" == printed[e]


@pytest.mark.parametrize("suffix, start", [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_the_suffix_picks_the_format(suffix, start, checkpoint, tmp_path, mnist_available):
    path = tmp_path / f"curve{suffix}"
    assert main(["certify", str(checkpoint), "--limit", "50", "--curve", str(path)]) == 0
    assert path.read_bytes().startswith(start)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve" + suffix, "my-model"]


@pytest.mark.parametrize("name", ["c.jpg", "c", "c.png.txt"])
def test_another_suffix_is_refused_before_certifying(name, checkpoint, tmp_path, monkeypatch,
                                                     capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("certified before the output check")

    monkeypatch.setattr("certnet.certify.evaluate", no_work)
    monkeypatch.setattr("certnet.checkpoint.load", no_work)
    assert main(["certify", str(checkpoint), "--curve", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert ".png, .pdf, .svg" in err and "nothing was computed" in err
    assert not (tmp_path / name).exists()

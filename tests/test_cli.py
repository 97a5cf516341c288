"""CLI smoke tests: every subcommand, and one-line errors with non-zero exits."""

import json
import subprocess
import sys

import pytest

from certnet.cli import main

TRAIN = ["train", "--method", "gloro", "--arch", "2c2f", "--dataset", "mnist", "--eps", "0.3",
         "--epochs", "1", "--train-limit", "512", "--eval-limit", "200", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_available):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_train_writes_results_and_plot(trained):
    results = json.loads((trained / "results.json").read_text())
    assert {"clean_accuracy", "vra", "eps", "norm", "n", "seconds", "lipschitz"} <= set(results)
    assert results["n"] == 200 and results["norm"] == "l2"
    assert (trained / "certified_accuracy.png").stat().st_size > 1000


def test_certify_outputs(trained, tmp_path, capsys):
    args = ["certify", str(trained), "--limit", "300", "--json", str(tmp_path / "r.json"),
            "--per-point", str(tmp_path / "p.csv"), "--curve", str(tmp_path / "c.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "VRA" in out and "clean accuracy" in out and "points/s" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 300 and 0 <= report["vra"] <= report["clean_accuracy"] <= 1
    assert report["lipschitz"]["body_bound"] >= report["lipschitz"]["body_estimate"]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "index,label,pred,certified,radius" and len(rows) == 301
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_attack_finds_no_flipped_certified_point(trained, capsys):
    assert main(["attack", str(trained), "--limit", "50", "--steps", "20",
                 "--restarts", "2"]) == 0
    assert "certified points flipped: 0" in capsys.readouterr().out


def test_info_reports_estimate_and_bound(trained, capsys):
    assert main(["info", str(trained)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "gloro" and info["lipschitz"]["bound_over_estimate"] >= 1.0


@pytest.mark.parametrize("argv, message", [
    (["certify", "/nonexistent/run"], "not a checkpoint directory"),
    (["info", "/nonexistent/run"], "not a checkpoint directory"),
    (["train", "--config", "no-such-preset", "--out", "x"], "unknown preset"),
    (["train", "--arch", "nope", "--epochs", "1", "--out", "{tmp}/o"], "unknown architecture"),
    (["train", "--method", "nope", "--epochs", "1", "--out", "{tmp}/o"], "unknown method"),
    (["train", "--dataset", "nope", "--epochs", "1", "--out", "{tmp}/o"], "unknown dataset"),
])
def test_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc"])
def test_bad_eps_is_rejected_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", "somewhere", "--eps", value])
    assert exit_info.value.code == 2


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "certnet.cli", "presets"], capture_output=True,
                          text=True, check=True)
    assert "gloro-mnist-0.3-2c2f" in done.stdout

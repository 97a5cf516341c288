"""CLI smoke tests: every subcommand, and one-line errors with non-zero exits."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import certnet
from certnet.archs import build_arch
from certnet.cli import (
    build_parser,
    main,
    preset_description,
)
from certnet.config import PRESETS, TrainConfig
from certnet.methods.gloro import GloroNet
from certnet.threads import choose_threads, default_threads

TRAIN = ["train", "--method", "gloro", "--arch", "2c2f", "--dataset", "mnist", "--eps", "0.3",
         "--epochs", "1", "--train-limit", "512", "--eval-limit", "200", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_available):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_help_names_every_registered_certifier_and_method():
    from certnet.certifiers import CERTIFIERS
    from certnet.methods import METHODS

    sub = build_parser()._subparsers._group_actions[0]
    text = " ".join(sub.choices["certify"].format_help().split())
    assert all(name in text for name in [*CERTIFIERS, *METHODS])


def test_train_writes_results_and_plot(trained):
    results = json.loads((trained / "results.json").read_text())
    assert {"clean_accuracy", "vra", "eps", "norm", "n", "seconds", "lipschitz"} <= set(results)
    assert results["n"] == 200 and results["norm"] == "l2"
    assert (trained / "certified_accuracy.png").stat().st_size > 1000
    phases = results["phase_seconds"]  # wall time split for benchmarks/whole_job.py
    assert {"data", "train", "evaluate", "checkpoint", "plot", "total"} <= set(phases)
    assert 0 < sum(v for k, v in phases.items() if k != "total") <= phases["total"]


def test_certify_outputs(trained, tmp_path, capsys):
    args = ["certify", str(trained), "--limit", "300", "--json", str(tmp_path / "r.json"),
            "--per-point", str(tmp_path / "p.csv"), "--curve", str(tmp_path / "c.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "VRA" in out and "clean accuracy" in out and "points/s" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 300 and 0 <= report["vra"] <= report["clean_accuracy"] <= 1
    assert report["lipschitz"]["body_bound"] >= report["lipschitz"]["body_estimate"]
    assert {"data", "certify", "total"} <= set(report["phase_seconds"])
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "index,label,pred,certified,radius,certifier" and len(rows) == 301
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_attack_finds_no_flipped_certified_point(trained, capsys):
    assert main(["attack", str(trained), "--limit", "50", "--steps", "20",
                 "--restarts", "2"]) == 0
    assert "certified points flipped: 0" in capsys.readouterr().out


def test_info_reports_estimate_and_bound(trained, capsys):
    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "gloro" and info["lipschitz"]["bound_over_estimate"] >= 1.0
    assert main(["info", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "gloro, certified in l2 at eps" in text and "sound bound" in text
    assert main(["info", "ibp-mnist-0.3-dm-medium-cpu"]) == 0  # no Lipschitz report there
    text = capsys.readouterr().out
    assert "certifiers (default ibp)" in text and "Lipschitz" not in text


def test_certify_several_radii_in_one_pass(trained, tmp_path, capsys):
    assert main(["certify", str(trained), "--limit", "300", "--eps", "0.1,0.3",
                 "--json", str(tmp_path / "several.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["eps", "clean", "%", "VRA", "%", "abstain", "%"]
    assert [line.split()[0] for line in lines[2:4]] == ["0.1", "0.3"]
    several = json.loads((tmp_path / "several.json").read_text())
    assert several["n"] == 300 and several["method"] == "gloro" and "lipschitz" in several
    assert [r["eps"] for r in several["results"]] == [0.1, 0.3]
    assert main(["certify", str(trained), "--limit", "300", "--eps", "0.3",
                 "--json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert "results" not in one and one["vra"] == several["results"][1]["vra"]
    assert several["results"][0]["vra"] >= one["vra"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc", "", "0.1,,0.3", "0.1,-1",
                                   "0.3,nan"])
def test_bad_eps_is_rejected_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", "somewhere", "--eps", value])
    assert exit_info.value.code == 2


def test_dataset_mismatch_only_on_request(tmp_path, capsys, mnist_available):
    model = GloroNet(build_arch("2c2f", (1, 28, 28), 10, seed=0), (1, 28, 28), 10)
    certnet.save_model(tmp_path / "m", model, eps=0.3, dataset="fashion-mnist")
    argv = ["certify", str(tmp_path / "m"), "--dataset", "mnist", "--limit", "20"]
    assert main(argv) == 2
    assert "trained on fashion-mnist, not mnist" in capsys.readouterr().err
    assert main([*argv, "--allow-dataset-mismatch"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "\n" not in err


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in [("certnet", parser), *sub.choices.items()]:
        for action in command._actions:
            if action is not sub:
                assert action.help and action.help.strip(), (name, action.dest)
    assert f"(default: {TrainConfig().epochs})" in sub.choices["train"].format_help()
    assert "(default: 2000)" in sub.choices["certify"].format_help()


def test_presets_print_whole_descriptions(capsys):
    assert main(["presets"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for path in PRESETS.glob("*.yaml"):
        assert f"{path.stem} {preset_description(path)}" in out


def test_thread_default_yields_to_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choose_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads = torch.get_num_threads()
    try:
        choose_threads()  # torch is loaded here: applied through torch as well
        assert os.environ["OMP_NUM_THREADS"] == str(default_threads())
        assert torch.get_num_threads() == default_threads()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads() == 1


def test_cli_import_does_not_load_torch():
    """The thread defaults only work if main() runs before torch is imported."""
    subprocess.run([sys.executable, "-c", "import sys, certnet.cli; "
                    "assert 'torch' not in sys.modules"], check=True)


def test_the_python_api_chooses_the_same_threads_as_the_cli():
    """`import certnet` in a fresh process sets torch's threads by the CLI's rule."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import certnet, torch; "
                          "print(torch.get_num_threads())"], check=True, env=env,
                         capture_output=True, text=True).stdout
    assert int(out) == default_threads()


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "certnet.cli", "presets"], capture_output=True,
                          text=True, check=True)
    assert "gloro-mnist-0.3-2c2f" in done.stdout


def test_local_lipschitz_trains_and_certifies_from_the_cli(trained, tmp_path, capsys):
    """Any GloRo checkpoint certifies with --certifier local-lipschitz (never below the global
    certificate); --method-arg lipschitz=local trains with local bounds and certifies with them
    by default."""
    assert main(["certify", str(trained), "--limit", "100", "--json", str(tmp_path / "g.json")]
                ) == 0
    assert main(["certify", str(trained), "--limit", "100", "--certifier", "local-lipschitz",
                 "--json", str(tmp_path / "l.json")]) == 0
    glob, local = (json.loads((tmp_path / f).read_text()) for f in ("g.json", "l.json"))
    assert local["vra"] >= glob["vra"]
    out = tmp_path / "local"
    args = [*TRAIN, "--train-limit", "256", "--eval-limit", "50", "--eps", "1.58",
            "--method-arg", "lipschitz=local", "--method-arg", "sparsity=0.01",
            "--arch-arg", "activation=clipped-relu", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["certifier"] == "local-lipschitz" and results["n"] == 50


def test_a_radius_may_be_a_fraction_as_in_papers():
    args = build_parser().parse_args(["certify", "ckpt", "--eps", "8/255,0.1"])
    assert args.eps == [8 / 255, 0.1]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["certify", "ckpt", "--eps", "1/0"])


def test_a_closed_pipe_ends_quietly():
    """`certnet presets | head -1`: no traceback, status 0."""
    done = subprocess.run(f"{sys.executable} -m certnet.cli presets | head -1", shell=True,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() and "Traceback" not in done.stderr


def test_an_implausible_radius_is_warned_about(trained, capsys):
    """eps = 76 on [0, 1] pixels: the ball holds the whole box; and the l2 checkpoint's radius
    reused in l_inf: another scale. Both certify (exit 0) with a warning saying why."""
    assert main(["certify", str(trained), "--limit", "10", "--eps", "76"]) == 0
    assert "holds the whole pixel box" in capsys.readouterr().err
    assert main(["certify", str(trained), "--limit", "10", "--norm", "linf"]) == 0
    assert "the checkpoint's l2 radius" in capsys.readouterr().err


def test_committed_models_load_and_certify_by_name(capsys, tmp_path, mnist_available):
    from certnet.zoo import card, names

    assert "gloro-mnist-0.3-2c2f" in names()
    model = certnet.load("gloro-mnist-0.3-2c2f")
    assert model.method == "gloro" and model.checkpoint_config["eps"] == 0.3
    info = card("gloro-mnist-0.3-2c2f")
    assert info["certified_accuracy"] == model.checkpoint_config["last_metrics"]["test_vra"]
    assert info["model_sha256"] == model.checkpoint_config["model_sha256"]
    assert main(["models", "--json", str(tmp_path / "cards.json")]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in names())
    assert len(json.loads((tmp_path / "cards.json").read_text())) == len(names())
    assert main(["certify", "gloro-mnist-0.3-2c2f", "--limit", "20"]) == 0
    assert "gloro/lipschitz l2 eps=0.3 n=20" in capsys.readouterr().out
    assert main(["certify", "no-such-model"]) == 2
    assert "`certnet models` lists them" in capsys.readouterr().err

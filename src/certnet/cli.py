"""The ``certnet`` command line: ``train``, ``certify``, ``attack``, ``info``, ``presets``.

Every user error prints ``error: <message>`` on one line and exits with status 2; nothing
partial is written (all outputs go through atomic writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from certnet.errors import CertnetError, ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def preset_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a preset under ``certnet/configs``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; choose from {names} or a .yaml file")
    return preset


def _number(kind: type, minimum: float):
    """argparse type: a finite ``kind`` (int or float) >= ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
        if not (minimum <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= {minimum}")
        return value
    return parse


_positive_float = _number(float, 0)
_positive_int = _number(int, 1)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2))


# -- train --------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from certnet.certify import evaluate
    from certnet.checkpoint import read_config, write_json
    from certnet.train import TrainConfig, Trainer

    overrides = {"method": args.method, "arch": args.arch, "dataset": args.dataset,
                 "eps": args.eps, "epochs": args.epochs, "batch_size": args.batch_size,
                 "lr": args.lr, "seed": args.seed, "data_dir": args.data_dir,
                 "device": args.device, "eps_train_factor": args.eps_train_factor,
                 "eval_every": args.eval_every, "eval_limit": args.eval_limit,
                 "train_limit": args.train_limit}
    if args.config:
        config = TrainConfig.from_yaml(preset_path(args.config), **overrides)
    elif args.resume and (Path(args.out) / "config.json").exists():
        saved = read_config(args.out).get("train") or {}
        config = TrainConfig.from_dict(
            {**saved, **{k: v for k, v in overrides.items() if v is not None}})
    else:
        config = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    if args.loss:
        config.method_kwargs = {**config.method_kwargs, "loss": args.loss}
    trainer = Trainer(config, args.out, resume=args.resume, progress=not args.quiet)
    trainer.fit()
    report = trainer.report or evaluate(trainer.model, trainer.test_data, config.eps)
    report.plot_curve(Path(args.out) / "certified_accuracy.png")
    lipschitz = trainer.model.lipschitz_report()
    write_json(Path(args.out) / "results.json",
               {**report.to_dict(), "dataset": config.dataset, "epochs": config.epochs,
                "lipschitz": lipschitz})
    print(report.summary())
    print(_lipschitz_line(lipschitz))
    print(f"model, results.json and certified_accuracy.png written to {args.out}")
    return 0


# -- certify ------------------------------------------------------------------------------------
def _load_eval(args: argparse.Namespace):
    from certnet.checkpoint import load
    from certnet.data import load_dataset
    from certnet.train import resolve_device

    model = load(args.model, device=resolve_device(args.device))
    config = model.checkpoint_config
    dataset = args.dataset or config.get("dataset")
    if dataset is None:
        raise ConfigError("the checkpoint names no dataset; pass --dataset")
    data = load_dataset(dataset, "test", args.data_dir)
    if data.input_shape != model.input_shape or data.num_classes != model.num_classes:
        raise ConfigError(f"dataset {dataset} has inputs {data.input_shape} and "
                          f"{data.num_classes} classes; the model expects {model.input_shape} "
                          f"and {model.num_classes}")
    if args.limit:
        data.x, data.y = data.x[:args.limit], data.y[:args.limit]
    eps = args.eps if args.eps is not None else config.get("eps")
    if eps is None:
        raise ConfigError("the checkpoint names no epsilon; pass --eps")
    return model, data, float(eps), dataset


def cmd_certify(args: argparse.Namespace) -> int:
    from certnet.certify import evaluate
    from certnet.checkpoint import write_json

    model, data, eps, dataset = _load_eval(args)
    report = evaluate(model, data, eps, certifier=args.certifier, batch_size=args.batch_size)
    lipschitz = model.lipschitz_report()
    print(report.summary())
    print(_lipschitz_line(lipschitz))
    if args.json:
        write_json(args.json, {**report.to_dict(), "dataset": dataset, "model": str(args.model),
                               "lipschitz": lipschitz})
    if args.per_point:
        report.write_per_point(args.per_point)
    if args.curve:
        report.plot_curve(args.curve)
    return 0


def _lipschitz_line(report: dict[str, float]) -> str:
    if "body_bound" not in report:
        return ""
    return (f"Lipschitz constant (all layers but the last): power-iteration estimate "
            f"{report['body_estimate']:.5g}, sound bound {report['body_bound']:.5g} "
            f"(bound/estimate {report['bound_over_estimate']:.4f})")


# -- attack -------------------------------------------------------------------------------------
def cmd_attack(args: argparse.Namespace) -> int:
    from certnet.attacks import attack_report
    from certnet.checkpoint import write_json

    model, data, eps, dataset = _load_eval(args)
    result = attack_report(model, data.x, data.y, eps, steps=args.steps, restarts=args.restarts,
                           batch_size=args.batch_size, progress=True)
    print(f"{model.method} {model.norm} eps={eps:g} n={result['n']}: clean accuracy "
          f"{100 * result['clean_accuracy']:.2f}%  PGD robust accuracy "
          f"{100 * result['robust_accuracy']:.2f}%  VRA {100 * result['vra']:.2f}%  "
          f"certified points flipped: {result['flipped_certified']}")
    if args.json:
        write_json(args.json, {**result, "dataset": dataset, "model": str(args.model)})
    if result["flipped_certified"]:
        print(f"error: UNSOUND: PGD flipped {result['flipped_certified']} certified points "
              f"(indices {result['violations'][:20]})", file=sys.stderr)
        return 3
    return 0


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from certnet.checkpoint import load

    model = load(args.model)
    config = model.checkpoint_config
    info = {key: config.get(key) for key in ("method", "norm", "eps", "dataset", "input_shape",
                                             "num_classes", "epoch", "certnet_version",
                                             "data_checksum", "method_config")}
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["layers"] = [spec["type"] for spec in config["layers"]]
    info["lipschitz"] = model.lipschitz_report()
    info["last_metrics"] = config.get("last_metrics")
    _print_json(info)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = next((line[2:].strip() for line in path.read_text().splitlines()
                      if line.startswith("# ")), "")
        print(f"{path.stem:32s} {first}")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certnet", description="certnet: train, certify and attack certifiably robust "
        "neural networks (GloRo; more methods plug in).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a certifiably robust model")
    train.add_argument("--config", help="a preset name (see `certnet presets`) or a YAML file")
    train.add_argument("--method")
    train.add_argument("--arch")
    train.add_argument("--dataset")
    train.add_argument("--data-dir")
    train.add_argument("--eps", type=_positive_float, help="certification radius")
    train.add_argument("--eps-train-factor", type=_positive_float)
    train.add_argument("--epochs", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--lr", type=_positive_float)
    train.add_argument("--loss", help="method loss (GloRo: ce, trades, emma)")
    train.add_argument("--seed", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-limit", type=_positive_int,
                       help="evaluate on the first N test points")
    train.add_argument("--train-limit", type=_positive_int, help="train on the first N points")
    train.add_argument("--device", help="cpu, cuda, cuda:1, or auto (default)")
    train.add_argument("--out", required=True, help="checkpoint directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (its saved config is the default)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    for name, func, text in (("certify", cmd_certify, "certify a test set"),
                             ("attack", cmd_attack, "PGD-attack a model; fails if a certified "
                                                    "point flips")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="checkpoint directory")
        p.add_argument("--dataset")
        p.add_argument("--data-dir")
        p.add_argument("--eps", type=_positive_float)
        p.add_argument("--limit", type=_positive_int, help="first N test points")
        p.add_argument("--device", default="auto")
        p.add_argument("--json", help="write results JSON here")
        p.set_defaults(func=func)
        if name == "certify":
            p.add_argument("--certifier", help="certificate to use (GloRo: lipschitz)")
            p.add_argument("--per-point", help="write per-point CSV here")
            p.add_argument("--curve", help="write certified-accuracy-vs-radius PNG here")
            p.add_argument("--batch-size", type=_positive_int, default=2000)
        else:
            p.add_argument("--steps", type=_positive_int, default=100)
            p.add_argument("--restarts", type=_positive_int, default=10)
            p.add_argument("--batch-size", type=_positive_int, default=500)

    info = sub.add_parser("info", help="describe a checkpoint and its Lipschitz bounds")
    info.add_argument("model")
    info.set_defaults(func=cmd_info)

    presets = sub.add_parser("presets", help="list the bundled YAML presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def _version() -> str:
    from certnet import __version__

    return f"certnet {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CertnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. disk full: atomic writes keep the previous files intact
        print(f"error: {err} (files written before this error are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"error: interrupted; the last complete checkpoint is kept{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

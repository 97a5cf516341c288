"""The ``certnet`` command line: ``train``, ``certify``, ``attack``, ``info``, ``presets``.

Every user error prints ``error: <message>`` on one line and exits with status 2; nothing
partial is written (all outputs go through atomic writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, NoReturn

from certnet import __version__
from certnet.config import PRESETS, TrainConfig, preset_path
from certnet.errors import CertnetError, ConfigError
from certnet.memory import keep_freed_memory
from certnet.threads import default_threads
from certnet.timing import Phases


def _number(kind: type, minimum: float):
    """argparse type: a finite ``kind`` (int or float) >= ``minimum``; a float may be written
    as a fraction, as radii are in papers (``8/255``)."""
    def parse(text: str):
        try:
            top, slash, bottom = text.partition("/")
            value = kind(float(top) / float(bottom)) if slash and kind is float else kind(text)
        except (ValueError, ZeroDivisionError) as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
        if not (minimum <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= {minimum}")
        return value
    return parse


_positive_float = _number(float, 0)
_positive_int = _number(int, 1)
_natural = _number(int, 0)


def _key_value(text: str) -> tuple[str, Any]:
    """argparse type: KEY=VALUE, the value read as YAML (``loss=trades``, ``slope=zero``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from err


def _eps_list(text: str) -> list[float]:
    """argparse type: one radius or a comma-separated list of them (finite, >= 0)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    return [_positive_float(item) for item in items]


# -- train --------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from certnet.certify import evaluate, plot_curve
    from certnet.checkpoint import read_config, write_json
    from certnet.train import Trainer

    overrides = {key: getattr(args, key) for key in (
        "method", "arch", "dataset", "eps", "epochs", "batch_size", "lr", "seed", "data_dir",
        "device", "eps_train_factor", "precision", "eval_every", "eval_limit", "train_limit")}
    if args.config:
        config = TrainConfig.from_yaml(preset_path(args.config), **overrides)
    elif args.resume and (Path(args.out) / "config.json").exists():
        saved = read_config(args.out).get("train") or {}
        config = TrainConfig.from_dict(
            {**saved, **{k: v for k, v in overrides.items() if v is not None}})
    else:
        config = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    for flag, field in (("method_arg", "method_kwargs"), ("arch_arg", "arch_kwargs")):
        if getattr(args, flag):
            config = TrainConfig.from_dict({**config.to_dict(), field: {
                **getattr(config, field), **dict(getattr(args, flag))}})
    phases = args.phases
    trainer = Trainer(config, args.out, resume=args.resume, progress=not args.quiet,
                      phases=phases, tensorboard=args.tensorboard)
    trainer.fit()
    if not trainer.world.main:  # torchrun: rank 0 evaluates and writes
        return 0
    if trainer.report is None:
        with phases("evaluate"):
            trainer.report = evaluate(trainer.model, trainer.test_data, config.eps)
    report = trainer.report
    files = ["model", "metrics.jsonl", "results.json"]
    with phases("plot"):
        if plot_curve([report], Path(args.out) / "certified_accuracy.png",
                      name=Path(args.out).resolve().name):
            files.append("certified_accuracy.png")
    with phases("report"):
        lipschitz = trainer.model.lipschitz_report()
    write_json(Path(args.out) / "results.json",
               {**report.to_dict(), "dataset": config.dataset, "epochs": config.epochs,
                "lipschitz": lipschitz, "phase_seconds": phases.to_dict()})
    print(report.summary())
    print(f"{', '.join(files[:-1])} and {files[-1]} are in {args.out}")
    return 0


# -- certify ------------------------------------------------------------------------------------
def _load_eval(args: argparse.Namespace):
    """The model, its test set (checked against the model), the radius or radii, the dataset
    and the distributed world (torchrun; one process otherwise)."""
    from certnet.checkpoint import load
    from certnet.data import load_dataset
    from certnet.device import resolve_device
    from certnet.distributed import setup

    world, device = setup(resolve_device(args.device))
    model = load(args.model, device=device)
    config = model.checkpoint_config
    eps = args.eps if args.eps is not None else config.get("eps")
    if eps is None:
        raise ConfigError("the checkpoint names no epsilon; pass --eps")
    trained_on = config.get("dataset")
    dataset = args.dataset or trained_on
    if dataset is None:
        raise ConfigError("the checkpoint names no dataset; pass --dataset")
    mismatch = f"the model was trained on {trained_on}, not {dataset}"
    if trained_on not in (None, dataset) and not args.allow_dataset_mismatch:
        raise ConfigError(f"{mismatch}; pass --allow-dataset-mismatch to evaluate it anyway")
    data = load_dataset(dataset, "test", args.data_dir)
    if data.input_shape != model.input_shape or data.num_classes != model.num_classes:
        raise ConfigError(f"dataset {dataset} has inputs {data.input_shape} and "
                          f"{data.num_classes} classes; the model expects {model.input_shape} "
                          f"and {model.num_classes}")
    if trained_on not in (None, dataset):
        print(f"warning: {mismatch} (--allow-dataset-mismatch)", file=sys.stderr)
    if args.limit:
        data.x, data.y = data.x[:args.limit], data.y[:args.limit]
    _warn_about_radii(model, eps, args.norm or model.norm, args.eps is None)
    return model, data, eps, dataset, world


def _warn_about_radii(model, eps: float | list[float], norm: str, trained: bool) -> None:
    """A warning on stderr for a radius no point can be certified at, and for the
    checkpoint's radius used in another norm than it was trained in."""
    from certnet.threat import implausible

    dim = math.prod(model.input_shape)
    for e in eps if isinstance(eps, list) else [eps]:
        reason = implausible(float(e), norm, dim)
        if reason:
            print(f"warning: {reason}", file=sys.stderr)
    if trained and norm != model.norm:
        print(f"warning: eps {eps} is the checkpoint's {model.norm} radius; a {norm} ball of "
              f"that radius is another size (l_inf r lies in l2 r sqrt(d), d = {dim}): pass "
              "--eps for this norm", file=sys.stderr)


def cmd_certify(args: argparse.Namespace) -> int:
    from certnet.certify import evaluate, plot_curve, reports_to_dict, summary_table
    from certnet.checkpoint import write_json

    with args.phases("data"):
        model, data, eps, dataset, world = _load_eval(args)
    radii = eps if isinstance(eps, list) else [float(eps)]
    with args.phases("certify"):
        reports = evaluate(model, data, radii, certifier=args.certifier,
                           batch_size=args.batch_size, norm=args.norm, world=world,
                           progress=world.main)
    if not world.main:  # torchrun: every rank certified its share; rank 0 reports
        return 0
    print(reports[0].summary() if len(reports) == 1 else summary_table(reports), flush=True)
    lipschitz = model.lipschitz_report()
    summary = model.lipschitz_summary(lipschitz)
    if summary:
        print(summary)
    if args.json:
        payload = reports[0].to_dict() if len(reports) == 1 else reports_to_dict(reports)
        write_json(args.json, {**payload, "dataset": dataset, "model": str(args.model),
                               "lipschitz": lipschitz, "phase_seconds": args.phases.to_dict()})
    if args.per_point:
        reports[0].write_per_point(args.per_point)
    if args.curve and not plot_curve(reports, args.curve,
                                     name=Path(args.model).resolve().name):
        print(f"note: no curve written: the {reports[0].certifier} certificate proves eps or "
              "nothing, not a radius per point (use --certifier lipschitz for radii)",
              file=sys.stderr)
    return 0


# -- attack -------------------------------------------------------------------------------------
def cmd_attack(args: argparse.Namespace) -> int:
    from certnet.audit import attack_report
    from certnet.checkpoint import write_json

    model, data, eps, dataset, world = _load_eval(args)
    if not world.main:  # the attack is not distributed: rank 0 runs it whole
        return 0
    eps = float(eps)
    result = attack_report(model, data.images(), data.y, eps, steps=args.steps,
                           restarts=args.restarts, batch_size=args.batch_size, progress=True,
                           certifier=args.certifier, norm=args.norm)
    print(f"{model.method}/{result['certifier']} {result['norm']} eps={eps:g} n={result['n']}: "
          f"clean accuracy {100 * result['clean_accuracy']:.2f}%  PGD robust accuracy "
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
    from certnet.certifiers import applicable
    from certnet.checkpoint import load

    model = load(args.model)
    config = model.checkpoint_config
    info = {key: config.get(key) for key in ("method", "norm", "eps", "dataset", "input_shape",
                                             "num_classes", "epoch", "certnet_version",
                                             "data_checksum", "method_config", "last_metrics")}
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["layers"] = [spec["type"] for spec in config["layers"]]
    info["default_certifier"] = model.default_certifier
    info["certifiers"] = {norm: applicable(model, norm) for norm in ("l2", "linf")}
    lipschitz = model.lipschitz_report()  # the costly part, last
    if lipschitz:
        info["lipschitz"] = lipschitz
    print(json.dumps(info, indent=2) if args.raw else _describe(args.model, info, model))
    return 0


def _describe(name: str, info: dict[str, Any], model) -> str:
    """``certnet info`` for a person: what the model is, how it was trained and certified."""
    def layer(spec: dict[str, Any]) -> str:
        text = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type")
        return f"{spec['type']}({text[:70]}{'...' if len(text) > 70 else ''})"

    options = ", ".join(f"{k}={v}" for k, v in (info["method_config"] or {}).items()) or "-"
    train = model.checkpoint_config.get("train") or {}
    metrics = info["last_metrics"] or {}
    lines = [f"{name}: {info['method']}, certified in {info['norm']} at eps {info['eps']} on "
             f"{info['dataset']} (epoch {info['epoch']}, certnet {info['certnet_version']})",
             f"  inputs {tuple(info['input_shape'])} -> {info['num_classes']} classes, "
             f"{info['parameters']:,} parameters",
             "  layers:", *(f"    {i:>2}  {layer(spec)}"
                            for i, spec in enumerate(model.checkpoint_config["layers"])),
             f"  options: {options}"]
    if "test_vra" in metrics:
        lines.append(f"  last evaluation: clean {100 * metrics['test_clean']:.2f}%, certified "
                     f"{100 * metrics['test_vra']:.2f}% (test points: "
                     f"{metrics.get('test_n') or train.get('eval_limit') or 'all'})")
    lines.append(f"  certifiers (default {info['default_certifier']}): " + "; ".join(
        f"{norm}: {', '.join(names) or 'none'}" for norm, names in info["certifiers"].items()))
    if "lipschitz" in info:
        lines.append(f"  {model.lipschitz_summary(info['lipschitz'])}")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from certnet.checkpoint import write_json
    from certnet.zoo import card, names

    cards = [card(name) for name in names()]
    print(f"{'name':<48} {'method':<10} {'norm':<5} {'eps':>6} {'clean %':>8} {'VRA %':>7} "
          "certifier")
    for c in cards:
        pct = ["-" if c[k] is None else f"{100 * c[k]:.2f}"
               for k in ("clean_accuracy", "certified_accuracy")]
        eps = "-" if c["eps"] is None else f"{c['eps']:g}"
        print(f"{c['name']:<48} {c['method']:<10} {c['norm'] or '-':<5} {eps:>6} "
              f"{pct[0]:>8} {pct[1]:>7} {c['certifier']}")
    if args.json:
        write_json(args.json, cards)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Methods with their options (--method-arg), scheduled loss weights and default
    certifier; then the certifiers and the architectures (with their arch_kwargs)."""
    import inspect

    from certnet.archs import ARCHS
    from certnet.certifiers import CERTIFIERS
    from certnet.methods import METHODS

    def options(fn, skip):
        return ", ".join(f"{p.name}={p.default!r}" for p in
                         inspect.signature(fn).parameters.values() if p.name not in skip) or "-"
    for name, cls in sorted(METHODS.items()):
        print(f"{name}  (norm {cls.norm}, default certifier {cls.default_certifier}, "
              f"init {cls.init})")
        skip = ("self", "layers", "input_shape", "num_classes")
        print(f"    --method-arg: {options(cls.__init__, skip)}")
        print(f"    loss_schedules: {options(cls.loss, ('self', 'x', 'y', 'eps'))}")
    kinds = {True: "radius", False: "eps or nothing"}
    print("certifiers:", ", ".join(f"{c.name} ({kinds[c.gives_radius]})" for c in
                                   sorted(CERTIFIERS.values(), key=lambda c: c.cost)))
    print("architectures (arch_kwargs):")
    for name, fn in sorted(ARCHS.items()):
        print(f"    {name}: {options(fn, ('input_shape', 'num_classes'))}")
    return 0


def preset_description(path: Path) -> str:
    """The comment block at the top of a preset file, as one paragraph."""
    comments = itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
    return " ".join(text for line in comments if (text := line.lstrip("#").strip()))


def cmd_verify(args: argparse.Namespace) -> int:
    """Decide VNN-LIB properties of ONNX networks (one instance, or a whole instances.csv):
    VNN-COMP result files and a JSON with the answers and timings."""
    from certnet.checkpoint import write_json
    from certnet.decide import decide, prepare
    from certnet.graph.onnx_import import load_onnx
    from certnet.properties import Instance, read_instances, read_vnnlib, write_result

    if args.instances:
        if args.model or args.property:
            raise ConfigError("give either MODEL.onnx PROPERTY.vnnlib or --instances CSV")
        instances = read_instances(args.instances)[:args.limit]
    elif args.model and args.property:
        instances = [Instance(Path(args.model), Path(args.property), args.timeout)]
    else:
        raise ConfigError("give MODEL.onnx PROPERTY.vnnlib, or --instances CSV")
    if args.result and len(instances) > 1:
        raise ConfigError("--result writes one instance's answer; with --instances use "
                          "--results-dir")
    methods = tuple(args.certifier.split(","))
    if args.results_dir:
        Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    rows, graphs = [], {}
    for inst in tqdm_or_list(instances, len(instances) > 1):
        try:
            if inst.onnx not in graphs:  # one float64 copy per network, for all its properties
                graph = load_onnx(inst.onnx)
                chain = graph.chain()
                graphs[inst.onnx] = graph.input_shape, chain, prepare(chain)
            shape, chain, twin = graphs[inst.onnx]
            verdict = decide(chain, shape, read_vnnlib(inst.vnnlib), methods,
                             timeout=args.timeout or inst.timeout_s, attack=not args.no_attack,
                             twin=twin)
        except CertnetError as err:
            if len(instances) == 1:
                raise
            rows.append({"onnx": str(inst.onnx), "vnnlib": str(inst.vnnlib), "result": "error",
                         "error": str(err), "total_seconds": 0.0})
            print(f"{inst.onnx.name} {inst.vnnlib.name}: error: {err}", flush=True)
            continue
        target = Path(args.result) if args.result else (
            Path(args.results_dir) / f"{inst.onnx.stem}__{inst.vnnlib.stem}.txt"
            if args.results_dir else None)
        if target is not None:
            write_result(target, verdict.result, verdict.x, verdict.y)
        rows.append({"onnx": str(inst.onnx), "vnnlib": str(inst.vnnlib), **verdict.to_dict()})
        by = sorted(set(filter(None, verdict.proved_by))) if verdict.status == "holds" else []
        print(f"{inst.onnx.name} {inst.vnnlib.name}: {verdict.result} ({verdict.status}"
              f"{''.join(', by ' + b for b in by)}, {sum(verdict.seconds.values()):.2f} s)",
              flush=True)
    answers = ("unsat", "sat", "unknown", "timeout", "error")
    table = {}
    for network in dict.fromkeys(Path(row["onnx"]).name for row in rows):
        mine = [row for row in rows if Path(row["onnx"]).name == network]
        table[network] = {**{r: sum(row["result"] == r for row in mine) for r in answers},
                          "seconds": round(sum(row["total_seconds"] for row in mine), 2)}
    if len(table) > 1:
        print(f"\n| network | {' | '.join(answers)} | seconds |\n|---|{'---|' * 6}")
        for network, c in table.items():
            print(f"| {network} | {' | '.join(str(c[r]) for r in answers)} | {c['seconds']} |")
    counts = {r: sum(c[r] for c in table.values()) for r in answers}
    print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
          f" of {len(rows)}; {sum(r['total_seconds'] for r in rows):.1f} s")
    if args.json:
        write_json(args.json, {"methods": methods, "counts": counts, "networks": table,
                               "instances": rows})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's network as ONNX (--onnx) and ℓ∞ robustness properties of its first
    test points as VNN-LIB files with an instances.csv (--vnnlib), for other verifiers."""
    from certnet.checkpoint import atomic_write, load
    from certnet.export import check_export_dir, export_vnnlib, onnx_bytes

    if not args.onnx and not args.vnnlib:
        raise ConfigError("nothing to export: give --onnx FILE and/or --vnnlib DIR")
    if args.vnnlib:
        check_export_dir(args.vnnlib)
    model = load(args.model)
    network = onnx_bytes(model) if args.onnx else None  # every layer converted, or refused
    if args.vnnlib:
        config = model.checkpoint_config
        norm = args.norm or model.norm
        eps = args.eps if args.eps is not None else config.get("eps")
        if norm != "linf":
            raise ConfigError(f"--vnnlib writes l_inf properties, and the {model.method} model "
                              f"is certified in {norm}: a VNN-LIB input set is a box, and no "
                              "box is an l2 ball; pass --norm linf --eps E for l_inf "
                              "properties")
        if args.eps is None and (eps is None or norm != model.norm):
            raise ConfigError(f"the checkpoint names no {norm} radius; pass --eps")
        if config.get("dataset") is None:
            raise ConfigError("the checkpoint names no dataset to take test points from")
        from certnet.data import load_dataset

        data = load_dataset(config["dataset"], "test", args.data_dir)
        if data.input_shape != model.input_shape or data.num_classes != model.num_classes:
            raise ConfigError(f"dataset {config['dataset']} has inputs {data.input_shape} and "
                              f"{data.num_classes} classes; the model expects "
                              f"{model.input_shape} and {model.num_classes}")
        n = min(args.points, len(data))
        export_vnnlib(model, data.images(slice(0, n)), data.y[:n], float(eps), args.vnnlib,
                      norm, onnx=args.onnx, timeout_s=args.timeout)
        print(f"wrote {n} l_inf robustness properties (eps {eps:g}, the first {n} "
              f"{config['dataset']} test points, their true labels) and instances.csv to "
              f"{args.vnnlib}" + ("" if args.onnx else ", with model.onnx"))
    if network is not None:
        atomic_write(args.onnx, network)
        print(f"wrote {args.onnx}")
    return 0
    config = model.checkpoint_config
    norm = args.norm or model.norm
    eps = args.eps if args.eps is not None else config.get("eps")
    if norm != "linf":
        raise ConfigError(f"--vnnlib writes l_inf properties, and the {model.method} model "
                          f"is certified in {norm}: a VNN-LIB input set is a box, no box is an "
                          "l2 ball; pass --norm linf --eps E for l_inf properties")
    if eps is None or config.get("dataset") is None:
        raise ConfigError("the checkpoint names no eps or no dataset; pass --eps")
    from certnet.data import load_dataset

    data = load_dataset(config["dataset"], "test", args.data_dir)
    if data.input_shape != model.input_shape or data.num_classes != model.num_classes:
        raise ConfigError(f"dataset {config['dataset']} does not fit the model's inputs")
    n = min(args.points, len(data))
    export_vnnlib(model, data.images(slice(0, n)), data.y[:n], float(eps), args.vnnlib,
                  norm, onnx=args.onnx, timeout_s=args.timeout)
    if args.onnx:
        atomic_write(args.onnx, network)
        print(f"wrote {args.onnx}")
    print(f"wrote {n} l_inf properties (eps {eps:g}, the first {n} {config['dataset']} test "
          f"points, their true labels) and instances.csv to {args.vnnlib}")
    return 0


def tqdm_or_list(items: list, bar: bool):
    """A progress bar over ``items`` on a terminal when there are several."""
    if bar and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(items, unit="instance")
    return items


def cmd_presets(args: argparse.Namespace) -> int:
    for path in sorted(PRESETS.glob("*.yaml")):
        print(path.stem)
        print(textwrap.fill(preset_description(path), width=96, initial_indent="    ",
                            subsequent_indent="    ", break_on_hyphens=False))
    return 0


# -- parser -------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help unless it has no default (None or an
    off switch) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default:" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``certnet`` argument parser (every option has a help text; every list of names is
    read from a registry)."""
    from certnet.certifiers import CERTIFIERS
    from certnet.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="certnet", formatter_class=_HelpFormatter,
        description="certnet: train, certify and attack certifiably robust neural networks "
        f"({', '.join(METHODS)}). CPU threads: OMP_NUM_THREADS if set, else one fewer "
        f"than the cores available ({default_threads()} here).")
    parser.add_argument("--version", action="version", version=f"certnet {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a certifiably robust model", formatter_class=_HelpFormatter,
        description="Train a model into --out: a checkpoint, metrics.jsonl and a sound test "
        "evaluation every --eval-every epochs, one log line per epoch (and a progress bar on a "
        "terminal). The flags override the values of --config (or, with --resume, of the "
        "run's saved config); the defaults shown apply without either.")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def override(flag: str, text: str, **kwargs: Any) -> None:
        default = defaults[flag[2:].replace("-", "_")]
        shown = f" (default: {default})" if default is not None else ""
        train.add_argument(flag, help=text + shown, **kwargs)

    train.add_argument("--config", metavar="PRESET|FILE", help="a preset name (see `certnet "
                       "presets`) or a YAML file with any TrainConfig fields")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="run directory (checkpoint, metrics, results)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (its saved config is the default); "
                       "a run stopped before its first checkpoint starts afresh")
    override("--method", "certification method", metavar="NAME")
    override("--arch", "architecture (`certnet methods` lists them with their options)",
             metavar="NAME")
    from certnet.data import DATASETS  # the registry alone: no torch

    override("--dataset", ", ".join(DATASETS.names()), metavar="NAME")
    override("--data-dir", "read the dataset from this directory (default: cache or download)",
             metavar="DIR")
    override("--eps", "certification radius", type=_positive_float, metavar="E")
    override("--eps-train-factor", "train at eps times this factor", type=_positive_float,
             metavar="F")
    override("--epochs", "training epochs", type=_positive_int, metavar="N")
    override("--batch-size", "training batch size", type=_positive_int, metavar="B")
    override("--lr", "Adam learning rate (times the config's lr_schedule)",
             type=_positive_float, metavar="LR")
    train.add_argument("--method-arg", metavar="KEY=VALUE", type=_key_value, action="append",
                       help="a keyword argument of the method (repeatable; e.g. loss=trades "
                       "for GloRo, slope=zero for IBP); `certnet methods` lists them")
    train.add_argument("--arch-arg", metavar="KEY=VALUE", type=_key_value, action="append",
                       help="a keyword argument of the architecture (repeatable; e.g. "
                       "width=512 for linf-dist-mlp); `certnet methods` lists them")
    override("--seed", "random seed (initialisation, data order)", type=int, metavar="S")
    override("--eval-every", "sound test evaluation every K epochs (0: after the last only)",
             type=_natural, metavar="K")
    override("--eval-limit", "evaluate on the first N test points (default: all)",
             type=_positive_int, metavar="N")
    override("--train-limit", "train on the first N training points (default: all)",
             type=_positive_int, metavar="N")
    override("--device", "auto (CUDA if available), cpu, cuda or cuda:N", metavar="D")
    override("--precision", "training precision: float32, bfloat16 or float16 (autocast; "
             "certification is always float64)", choices=("float32", "bfloat16", "float16"))
    train.add_argument("--tensorboard", metavar="DIR",
                       help="also log each epoch's metrics.jsonl numbers as TensorBoard "
                       "scalars in DIR (pip install 'certnet[tensorboard]'; view with "
                       "`tensorboard --logdir DIR`)")
    train.add_argument("--quiet", action="store_true",
                       help="no per-epoch lines and no progress bar; only the final summary")
    train.set_defaults(func=cmd_train)

    for name, func, text in (("certify", cmd_certify, "certify a test set"),
                             ("attack", cmd_attack, "PGD-attack a model; exits 3 if a certified "
                                                    "point flips")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           formatter_class=_HelpFormatter)
        p.add_argument("model", help="checkpoint directory, or a model name (certnet models)")
        p.add_argument("--dataset", metavar="NAME",
                       help="test set (default: the checkpoint's dataset)")
        p.add_argument("--allow-dataset-mismatch", action="store_true",
                       help="evaluate on a --dataset other than the model's (with a warning)")
        p.add_argument("--data-dir", metavar="DIR", help="read the dataset from this directory "
                       "(default: cache or download)")
        p.add_argument("--limit", type=_positive_int, metavar="N",
                       help="use the first N test points (default: all)")
        p.add_argument("--device", default="auto", metavar="D",
                       help="auto (CUDA if available), cpu, cuda or cuda:N")
        p.add_argument("--json", metavar="FILE", help="write the results as JSON to this file")
        p.add_argument("--certifier", metavar="NAME",
                       help="certificate to use: " + ", ".join(CERTIFIERS.names()) +
                       " (best: every one that applies, per point) (default: the model's; " +
                       ", ".join(f"{n}: {c.default_certifier}" for n, c in METHODS.items()) +
                       ")")
        p.add_argument("--norm", choices=("l2", "linf"), help="threat model (default: the "
                       "model's training norm)")
        p.set_defaults(func=func)
        if name == "certify":
            p.add_argument("--eps", type=_eps_list, metavar="E[,E...]",
                           help="radius, or comma-separated radii certified in one pass "
                           "(e.g. 0.1,0.3,0.5: a table, and --json lists them under "
                           "'results') (default: the checkpoint's eps)")
            p.add_argument("--per-point", metavar="FILE.csv", help="write a per-point CSV "
                           "(label, prediction, certified, radius) here; with several --eps, at "
                           "the first")
            p.add_argument("--curve", metavar="FILE", help="plot certified accuracy against "
                           "radius here (.png, .pdf or .svg: the format follows the suffix), "
                           "down to 0 at the largest certified radius, each --eps marked with "
                           "its VRA; needs a certifier that computes radii")
            p.add_argument("--batch-size", type=_positive_int, default=2000, metavar="B",
                           help="points per certify call")
        else:
            p.add_argument("--eps", type=_positive_float, metavar="E",
                           help="attack radius (default: the checkpoint's eps)")
            p.add_argument("--steps", type=_positive_int, default=100, metavar="N",
                           help="PGD steps")
            p.add_argument("--restarts", type=_positive_int, default=10, metavar="N",
                           help="PGD restarts (random and boundary starts)")
            p.add_argument("--batch-size", type=_positive_int, default=500, metavar="B",
                           help="points attacked together")

    info = sub.add_parser("info", help="describe a checkpoint and its Lipschitz bounds",
                          formatter_class=_HelpFormatter,
                          description="Describe a checkpoint: method, radius, data, layers, "
                          "options, last evaluation, the certifiers that apply and (GloRo) the "
                          "Lipschitz estimate vs sound bound; --json for the raw form.")
    info.add_argument("model", help="checkpoint directory, or a model name (certnet models)")
    info.add_argument("--json", action="store_true", dest="raw",
                      help="print the raw description as JSON")
    info.set_defaults(func=cmd_info)

    methods = sub.add_parser("methods", help="list the methods, their options and the "
                             "certifiers", description="List the registered methods (their "
                             "--method-arg options, scheduled loss weights and default "
                             "certifier) and the certifiers.")
    methods.set_defaults(func=cmd_methods)

    models = sub.add_parser("models", help="list the committed models, loadable by name",
                            description="List the committed checkpoints (certnet.zoo) with "
                            "their model cards: data, radius, norm, certifier, the clean and "
                            "certified accuracy their training run measured.")
    models.add_argument("--json", metavar="FILE", help="also write the cards as JSON here")
    models.set_defaults(func=cmd_models)

    verify = sub.add_parser(
        "verify", help="decide VNN-LIB properties of an ONNX network",
        formatter_class=_HelpFormatter,
        description="Decide VNN-LIB properties of ONNX networks: unsat (holds: proved by "
        "rigorous bounds), sat (violated: a counterexample whose float64 outputs satisfy the "
        "violation exactly), unknown or timeout; VNN-COMP result files and a JSON with timings.")
    verify.add_argument("model", nargs="?", help="the network, an ONNX file")
    verify.add_argument("property", nargs="?", help="the property, a VNN-LIB file")
    verify.add_argument("--instances", metavar="CSV", help="a VNN-COMP instances.csv (rows "
                        "onnx,vnnlib,timeout_s relative to its folder) instead of one instance")
    verify.add_argument("--limit", type=_positive_int, metavar="N",
                        help="with --instances: the first N rows")
    verify.add_argument("--certifier", default="ibp,crown,alpha-crown", metavar="M[,M...]",
                        help="bound methods tried in order on the boxes still open")
    verify.add_argument("--timeout", type=_positive_float, metavar="S",
                        help="seconds per instance, checked between stages (default: the "
                        "csv's, else none)")
    verify.add_argument("--no-attack", action="store_true",
                        help="skip the falsification search (never answers sat)")
    verify.add_argument("--result", metavar="FILE", help="write the VNN-COMP result file here")
    verify.add_argument("--results-dir", metavar="DIR",
                        help="with --instances: one result file per instance here")
    verify.add_argument("--json", metavar="FILE", help="write answers and timings as JSON")
    verify.set_defaults(func=cmd_verify)

    export = sub.add_parser(
        "export", help="export a checkpoint as ONNX and VNN-LIB robustness properties",
        formatter_class=_HelpFormatter,
        description="Export a checkpoint's network as ONNX (--onnx; float32 weights, standard "
        "opset-17 operators, outputs equal to certnet's to float32 rounding) and l_inf "
        "robustness properties of its first --points test points (their true labels) at "
        "--eps as VNN-LIB files with a VNN-COMP instances.csv (--vnnlib), so other verifiers "
        "can re-check certnet's certificates (`certnet verify --instances DIR/instances.csv`).")
    export.add_argument("model", help="checkpoint directory, or a model name (certnet models)")
    export.add_argument("--onnx", metavar="FILE.onnx", help="write the network here")
    export.add_argument("--vnnlib", metavar="DIR", help="write prop_INDEX_EPS.vnnlib files and "
                        "instances.csv into this new (or earlier export's) folder, with "
                        "model.onnx unless --onnx is given")
    export.add_argument("--points", type=_positive_int, default=10, metavar="N",
                        help="with --vnnlib: the first N test points")
    export.add_argument("--eps", type=_positive_float, metavar="E",
                        help="with --vnnlib: the l_inf radius (default: the checkpoint's eps)")
    export.add_argument("--norm", choices=("l2", "linf"), help="with --vnnlib: the threat "
                        "model (default: the model's; only linf can be written)")
    export.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                        help="with --vnnlib: the timeout_s column of instances.csv")
    export.add_argument("--data-dir", metavar="DIR", help="read the dataset from this "
                        "directory (default: cache or download)")
    export.set_defaults(func=cmd_export)

    presets = sub.add_parser("presets", help="list the bundled YAML presets",
                             description="List the bundled YAML presets with their "
                             "descriptions.")
    presets.set_defaults(func=cmd_presets)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    if args.command != "train":
        return "interrupted"
    from certnet.train import has_resumable_state

    if has_resumable_state(args.out):
        return "interrupted; the last complete checkpoint is kept (continue with --resume)"
    return ("interrupted before the first checkpoint; nothing was saved: run the same command "
            "again (with or without --resume)")


#: the options that name files a command writes
OUTPUTS = ("json", "per_point", "curve", "result", "onnx")
#: the suffixes an output must have, where it matters (certnet.certify.CURVE_FORMATS)
OUTPUT_SUFFIXES = {"curve": (".png", ".pdf", ".svg")}


def check_outputs(args: argparse.Namespace) -> None:
    """ConfigError now, before any work, for an output file that could not be written: its
    folder missing or not writable, the path a folder, or its suffix not a format written."""
    for name in OUTPUTS:
        path = getattr(args, name, None)
        if path is None:
            continue
        path, flag = Path(path), f"--{name.replace('_', '-')}"
        if path.is_dir():
            raise ConfigError(f"{flag} {path} is a folder, not a file")
        suffixes = OUTPUT_SUFFIXES.get(name)
        if suffixes and path.suffix.lower() not in suffixes:
            raise ConfigError(f"{flag} {path}: the suffix must be one of {', '.join(suffixes)} "
                              "(the format follows it); nothing was computed")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"{flag} {path}: cannot write into {path.parent} (missing or not "
                              "writable); nothing was computed")


def main(argv: list[str] | None = None) -> int:
    """Run the ``certnet`` command line; returns the exit status."""
    keep_freed_memory()
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    args = build_parser().parse_args(argv)
    args.phases = Phases()  # wall time per phase, for results files
    try:
        check_outputs(args)
        return args.func(args)
    except CertnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. disk full: atomic writes keep the previous files intact
        print(f"error: {err} (files written before this error are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {_interrupted(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `certnet info ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if "certnet.distributed" in sys.modules:  # a torchrun rank: leave the group cleanly
            sys.modules["certnet.distributed"].shutdown()


def run() -> NoReturn:
    """The console entry point: :func:`main`, then an immediate exit. The interpreter's
    teardown of torch takes ~0.7 s here and does nothing a finished command needs: every file
    is written atomically and closed, and the process group is left, by then; the standard
    streams are flushed first."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()

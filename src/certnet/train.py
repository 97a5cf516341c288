"""One Trainer for every method: schedules, seeded determinism, per-epoch sound evaluation,
``metrics.jsonl``, an atomic checkpoint per epoch and ``resume``."""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from certnet import distributed
from certnet.archs import build_arch
from certnet.certify import Report, evaluate
from certnet.checkpoint import (
    atomic_write,
    load_train_state,
    read_config,
    save_model,
    save_train_state,
)
from certnet.config import TrainConfig
from certnet.data import Dataset, load_dataset
from certnet.data.augment import AUGMENTATIONS
from certnet.device import resolve_device
from certnet.errors import ConfigError, TrainingError
from certnet.methods import get_method
from certnet.methods.base import CertifiedModel
from certnet.optim import Optimizer
from certnet.tblog import EpochLog, check_log_dir
from certnet.timing import Phases


def build_model(config: TrainConfig, input_shape: tuple[int, ...],
                num_classes: int) -> CertifiedModel:
    method = get_method(config.method)
    layers = build_arch(config.arch, input_shape, num_classes, seed=config.seed,
                        init=config.init or method.init, **config.arch_kwargs)
    return method(layers, input_shape, num_classes, **config.method_kwargs)


def build_optimizer(config: TrainConfig, model: CertifiedModel) -> Optimizer:
    """Adam or SGD over the model's parameter groups with the config's settings."""
    groups = [{"lr_scale": 1.0, **group} for group in model.param_groups()]
    return config.optimizer_class()(groups, lr=config.lr, weight_decay=config.weight_decay,
                                    **config.optimizer_kwargs)


#: Config fields that do not change the trained weights: a resumed run may change them.
OUTSIDE_TRAINING = ("device", "eval_every", "eval_limit", "monitor_limit")


class Trainer:
    """Trains ``config`` into ``out_dir``; ``resume=True`` continues from the last epoch (or,
    for a run stopped before its first checkpoint, starts it afresh).

    ``progress`` prints one line per epoch (:func:`epoch_line`) and, on a terminal only, a
    progress bar. ``phases`` (optional) accumulates the wall time of data loading, training
    steps, evaluation and checkpoints. ``tensorboard`` (a folder) also logs every metrics.jsonl
    record as TensorBoard scalars (:mod:`certnet.tblog`); it is checked before any work."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, resume: bool = False,
                 progress: bool = True, phases: Phases | None = None,
                 tensorboard: str | Path | None = None) -> None:
        self.config = config
        ramp = config.eps_schedule
        if get_method(config.method).needs_eps_ramp and config.eps > 0 and \
                ramp.shape == "constant" and ramp.start == 1:
            warnings.warn(f"{config.method} trains at the full eps {config.eps:g} from the "
                          "first step, which tends to collapse to one class: ramp it, e.g. "
                          "eps_schedule: {start: 0.0, end: 1.0, begin: 0.1, finish: 0.5, "
                          "shape: smooth} (the crown-ibp/ibp presets do)", stacklevel=2)
        self.out_dir = Path(out_dir)
        self.phases = phases or Phases()
        self.world, self.device = distributed.setup(resolve_device(config.device))
        self.progress = progress and self.world.main
        logs = tensorboard is not None and self.world.main  # rank 0 alone logs
        if logs:
            check_log_dir(tensorboard, fresh=not (resume and has_resumable_state(out_dir)))
        with self.phases("data"):
            self.train_data = load_dataset(config.dataset, "train", config.data_dir)
            self.test_data = load_dataset(config.dataset, "test", config.data_dir)
        if config.train_limit:
            self.train_data = _subset(self.train_data, slice(config.train_limit))
        if config.eval_limit:
            self.test_data = _subset(self.test_data, slice(config.eval_limit))
        stride = -(-len(self.test_data) // config.monitor_limit) if config.monitor_limit else 1
        self.monitor_data = _subset(self.test_data, slice(None, None, stride))
        # images train in channels_last: measured 14-17% faster steps on the CPU (4C3F GloRo,
        # DM-medium IBP), 4% on 2C2F; the checkpoint stores plain contiguous tensors
        self.memory_format = (torch.channels_last if len(self.train_data.input_shape) == 3
                              else torch.contiguous_format)
        with self.phases("build"):
            self.model = build_model(config, self.train_data.input_shape,
                                     self.train_data.num_classes).to(
                                         self.device, memory_format=self.memory_format)
            self.optimizer = build_optimizer(config, self.model)
        try:  # every scheduled loss weight must be an argument of the method's loss
            inspect.signature(self.model.loss).bind(None, None, 0.0, **config.loss_schedules)
        except TypeError as err:
            raise ConfigError(f"loss_schedules {sorted(config.loss_schedules)} do not fit "
                              f"the {config.method} loss: {err}") from err
        self.loss = distributed.loss_function(self.model, self.world, self.device)
        # mixed precision for training only: certification uses the float64 copy regardless
        self.autocast = {"float32": None, "bfloat16": torch.bfloat16,
                         "float16": torch.float16}[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=config.precision == "float16")
        self.start_epoch = 0
        self.report: Report | None = None
        self._resumed_record: dict[str, Any] | None = None  # to log again in TensorBoard
        if has_resumable_state(self.out_dir):
            if not resume:
                raise ConfigError(f"{self.out_dir} already holds a training run; pass --resume "
                                  "to continue it or choose another --out")
            self._resume()
        # steps are 1-based epochs: a resume purges from its checkpointed epoch, logged again
        self.tensorboard = EpochLog(tensorboard, self.start_epoch) if logs else None

    # -- state ---------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for idx, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.scaler.is_enabled():  # float16 loss scaling
            tensors["scaler.scale"] = torch.as_tensor(self.scaler.get_scale())
        return tensors

    def _resume(self) -> None:
        saved = read_config(self.out_dir).get("train")
        current = json.loads(json.dumps(self.config.to_dict()))
        # A field the saved run lacks predates it, so that run used the field's default.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        differs = sorted(k for k in current if k not in OUTSIDE_TRAINING and saved and
                         saved.get(k, defaults.get(k)) != current[k])
        if differs:
            raise ConfigError(f"--resume: the config differs from the run in {self.out_dir} "
                              f"in {differs}")
        tensors, meta = load_train_state(self.out_dir)
        self.model.load_state_dict(
            {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim_state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict(
            {"state": optim_state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "scaler.scale" in tensors:
            self.scaler = torch.amp.GradScaler(self.device.type,
                                               init_scale=float(tensors["scaler.scale"]))
        self.start_epoch = meta["epoch"] + 1
        if self.progress:
            print(f"resuming {self.out_dir} after epoch {self.start_epoch} of "
                  f"{self.config.epochs}", flush=True)
        # metrics.jsonl may lack the checkpointed epoch or hold epochs after it: rebuild it
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if json.loads(line)["epoch"] < self.start_epoch]
        atomic_write(path, "".join(f"{line}\n" for line in
                                   [*kept, json.dumps(meta["metrics"])]))
        self._resumed_record = meta["metrics"]

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the configured epoch count (or only up to epoch ``stop_after``).

        SIGTERM is turned into KeyboardInterrupt while training, so both it and Ctrl-C stop
        the run with the last per-epoch checkpoint intact (every write is atomic)."""
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if self.tensorboard is not None and self._resumed_record:
                self.tensorboard.write(self._resumed_record)
                self._resumed_record = None
            return self._fit(stop_after)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        cfg = self.config
        y_all = self.train_data.y
        steps = (len(y_all) + cfg.batch_size - 1) // cfg.batch_size
        eps_train = cfg.eps * cfg.eps_train_factor
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {}
        for epoch in range(self.start_epoch, min(cfg.epochs, stop_after or cfg.epochs)):
            generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            order = torch.randperm(len(y_all), generator=generator)
            self.model.train()
            start = time.perf_counter()
            # loss, clean, robust, n: summed on the device, no host sync per step
            totals = torch.zeros(4, dtype=torch.float64, device=self.device)
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if self.progress else True)  # None: only on a terminal
            for step in bar:
                progress = (epoch + step / steps) / cfg.epochs
                eps = eps_train * cfg.eps_schedule(progress)
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr * cfg.lr_schedule(progress) * group.get("lr_scale", 1.0)
                extra = {k: v(progress) for k, v in cfg.loss_schedules.items()}
                kept_values = self.model.on_progress(progress) or {}
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                if len(idx) < self.world.size:  # a last batch too small to share: every rank
                    continue  # skips it alike
                self._step(idx, generator, eps, extra, totals)
                if not bar.disable and step % 10 == 0:
                    t = totals.tolist()
                    bar.set_postfix(loss=f"{t[0] / t[3]:.3f}", acc=f"{t[1] / t[3]:.3f}",
                                    vra=f"{t[2] / t[3]:.3f}", eps=f"{eps:.3f}")
            loss_sum, clean, robust, n = self.world.sum(totals).tolist()
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "nothing was saved"
                raise TrainingError(
                    f"the weights are NaN or infinite after epoch {epoch + 1} (the training loss "
                    f"averaged {loss_sum / n:.4g}): the run diverged; {kept} (a lower lr or "
                    "grad_clip may help)")
            train_seconds = time.perf_counter() - start
            self.phases.add("train", train_seconds)
            record = {"epoch": epoch + 1, "eps_train": eps, "lr": cfg.lr * cfg.lr_schedule(
                      progress), "train_loss": loss_sum / n, "train_clean": clean / n,
                      "train_vra_estimate": robust / n, "train_seconds": train_seconds,
                      **extra, **kept_values}
            self.start_epoch = epoch + 1
            if self.world.main:  # rank 0 alone evaluates, writes and logs
                self._evaluate_and_log(epoch, record)
        self.world.barrier()  # every rank ends with rank 0's last checkpoint on disk
        return record

    def _step(self, idx: torch.Tensor, generator: torch.Generator, eps: float,
              extra: dict[str, float], totals: torch.Tensor) -> None:
        """One optimiser step on the batch ``idx`` (this rank's share of it); its summed loss,
        clean and robust counts and size are added to ``totals`` on the device (no host sync
        per step)."""
        cfg = self.config
        # augmented whole, on every rank: the same draws
        x = AUGMENTATIONS[cfg.augment](self.train_data.images(idx), generator)
        part = self.world.shard(idx)
        x = x[part].to(self.device, memory_format=self.memory_format)
        y = self.train_data.y[idx][part].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast,
                            enabled=self.autocast is not None):
            loss, stats = self.loss(x, y, eps, **extra)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks: weighting each shard's mean loss by its share of
        # the batch makes that the gradient of the whole batch's mean
        self.scaler.scale(loss * (len(y) * self.world.size / len(idx))).backward()
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_step()
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * len(y),
                                   stats["clean"].sum().double(),
                                   stats["robust"].sum().double(),
                                   totals.new_tensor(float(len(y)))])

    def _evaluate_and_log(self, epoch: int, record: dict[str, Any]) -> None:
        """Certify the test set (monitor subset before the last epoch) when due, save the
        checkpoint and training state, append ``record`` to metrics.jsonl (and TensorBoard)
        and print it."""
        cfg = self.config
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            with self.phases("evaluate"):
                report = evaluate(self.model, self.test_data if last else self.monitor_data,
                                  cfg.eps)
            self.report = report if last else None
            record.update(test_clean=report.clean_accuracy, test_vra=report.vra,
                          test_abstain=report.abstain_rate, test_n=report.n,
                          eval_seconds=report.seconds)
        with self.phases("checkpoint"):
            save_model(self.out_dir, self.model, eps=cfg.eps, dataset=cfg.dataset,
                       data_checksum=self.train_data.checksum, epoch=epoch + 1,
                       train=cfg.to_dict(), last_metrics=record)
            groups = self.optimizer.state_dict()["param_groups"]
            save_train_state(self.out_dir, epoch, self._state_tensors(),
                             {"param_groups": groups, "metrics": record})
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.progress:
            print(epoch_line(record, cfg.epochs), flush=True)


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One readable log line for a ``metrics.jsonl`` record."""
    line = (f"epoch {record['epoch']}/{epochs}  eps {record['eps_train']:.3f}  "
            f"loss {record['train_loss']:.4f}  train acc {100 * record['train_clean']:.2f}%")
    if "test_clean" in record:
        line += (f"  test clean {100 * record['test_clean']:.2f}%  "
                 f"VRA {100 * record['test_vra']:.2f}%")
        if "test_n" in record:
            line += f" ({record['test_n']} points)"
    return f"{line}  {record['train_seconds']:.1f} s"


def has_resumable_state(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a training state that ``resume`` can continue."""
    return any((Path(out_dir) / "state").glob("epoch-*"))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _subset(data: Dataset, index: slice) -> Dataset:
    return dataclasses.replace(data, x=data.x[index], y=data.y[index])


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False,
          progress: bool = True, tensorboard: str | Path | None = None) -> CertifiedModel:
    """Train ``config`` into ``out_dir`` and return the model; ``tensorboard``: a folder for
    TensorBoard scalars of every epoch (needs ``pip install 'certnet[tensorboard]'``)."""
    trainer = Trainer(config, out_dir, resume=resume, progress=progress,
                      tensorboard=tensorboard)
    trainer.fit()
    return trainer.model


"""Checkpoints: a directory with ``model.safetensors`` + ``config.json`` (never pickle).

``config.json`` records method, layer spec, input shape, classes, epsilon, dataset and its
checksum, the training config, the certnet version and the sha256 of ``model.safetensors``,
so a torn or swapped file is detected. Every file is written atomically (temp file, fsync,
rename). Training state for ``--resume`` lives in ``DIR/state/epoch-NNNN/`` directories that
appear atomically (renamed from a temp directory once complete).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Len
from pydantic import BaseModel, Field
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from certnet import __version__
from certnet.config import TrainConfig
from certnet.errors import CertnetError, CheckpointError, ConfigError, UnsupportedLayerError
from certnet.files import UMASK, atomic_write, fsync_dir
from certnet.methods import get_method
from certnet.methods.base import CertifiedModel
from certnet.nn.integrity import check_certifiable
from certnet.nn.spec import build_layers, check_specs, describe_layers
from certnet.schema import STRICT, Count, NonNegative, Positive, validate

FORMAT = "certnet-checkpoint"
#: 2: ``method_config`` names every option of the method (1: missing ones take defaults) and
#: ``description_sha256`` seals the model's description
FORMAT_VERSION = 2
#: the fields of config.json that define the model (with the weights)
DESCRIPTION = ("method", "norm", "input_shape", "num_classes", "layers", "method_config")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointConfig(BaseModel):
    """The schema of ``config.json``; ``layers``, ``method_config`` and ``train`` are
    checked further against their layer types', method's and training schemas."""

    model_config = STRICT
    format: Literal["certnet-checkpoint"]
    format_version: Positive
    certnet_version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+")]
    method: str
    norm: Literal["l2", "linf"] | None = None
    input_shape: Annotated[list[Positive], Len(1, 4)]
    num_classes: Annotated[int, Field(ge=2)]
    layers: Annotated[list[dict[str, Any]], Len(1)]
    method_config: dict[str, Any] = {}
    model_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    description_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None
    eps: NonNegative | None = None
    dataset: str | None = None
    data_checksum: str | None = None
    epoch: Count | None = None
    train: dict[str, Any] | None = None
    last_metrics: dict[str, float | str | None] | None = None


def write_json(path: str | Path, payload: Any) -> None:
    """Atomically write ``payload`` as indented JSON."""
    atomic_write(path, json.dumps(payload, indent=2))


def _tensor_blob(tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """safetensors bytes of CPU copies of ``tensors`` and their sha256."""
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return blob, hashlib.sha256(blob).hexdigest()


def _version_tuple(version: Any) -> tuple[int, ...]:
    """The leading numbers of a version string (none for anything else)."""
    parts = version.split(".")[:3] if isinstance(version, str) else []
    return tuple(map(int, itertools.takewhile(str.isdigit, parts)))


def description_sha256(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the model-defining fields (``DESCRIPTION``): an edit
    that describes another model (a layer dropped, a mean changed) is refused like a changed
    weight."""
    described = {key: config.get(key) for key in DESCRIPTION}
    return hashlib.sha256(json.dumps(described, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def model_config(model: CertifiedModel, **extra: Any) -> dict[str, Any]:
    """The JSON description that, with the weights, rebuilds ``model``."""
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "certnet_version": __version__,
        "method": model.method,
        "norm": model.norm,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "layers": describe_layers(model.layers),
        "method_config": model.method_config(),
        **extra,
    }
    return {**config, "description_sha256": description_sha256(config)}


def _write_directory(final: Path, write: Callable[[Path], None], mode: int = 0o700) -> None:
    """Make ``final`` appear whole or not at all: ``write`` fills a temporary sibling (named
    ``.<final's name>.*``, permissions ``mode``), which then replaces ``final`` by a rename (an
    old ``final`` removed first). On failure the sibling is removed and the error propagates."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, mode)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(directory: str | Path, model: CertifiedModel, **extra: Any) -> None:
    """Write ``model.safetensors`` then ``config.json`` (which names the weights' sha256),
    everything computed first. A new directory appears whole or not at all (written as a
    temporary sibling, then renamed); in an existing one (a training run's) each file is
    replaced atomically, and a crash between the two leaves a pair the sha256 refuses."""
    directory = Path(directory)
    blob, sha256 = _tensor_blob(model.state_dict())
    config = model_config(model, model_sha256=sha256, **extra)  # e.g. an undescribable layer

    def write(folder: Path) -> None:
        atomic_write(folder / MODEL_FILE, blob)
        write_json(folder / CONFIG_FILE, config)

    if directory.exists():
        write(directory)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _write_directory(directory, write, mode=0o777 & ~UMASK)  # the usual mode


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint, checked against its schema (:class:`CheckpointConfig`,
    each layer's, the method's and the training config's) before anything is built."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint directory (nor a model name: "
                              "`certnet models` lists them)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a certnet checkpoint config")
    format_version = config.get("format_version")
    if _version_tuple(config.get("certnet_version")) > _version_tuple(__version__) or (
            type(format_version) is int and format_version > FORMAT_VERSION):
        raise CheckpointError(
            f"{directory} was written by certnet {config.get('certnet_version')}, newer than "
            f"this certnet {__version__}; upgrade certnet to load it")
    try:
        validate(CheckpointConfig, config, "")
        validate(get_method(config["method"]).options_schema(config["format_version"] > 1),
                 config.get("method_config", {}), "method_config")
        check_specs(config["layers"])
        if config.get("train") is not None:
            TrainConfig.from_dict(config["train"], "train")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if config["format_version"] > 1 and \
            config.get("description_sha256") != description_sha256(config):
        raise CheckpointError(f"{path}: the model description ({', '.join(DESCRIPTION)}) does "
                              "not match its description_sha256: edited after saving")
    return config


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line (torch's state-dict errors name the offending
    key on their second line), shortened to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_fit(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless the layers ``config`` describes take exactly the layer tensors
    of ``state``: a dry run on the meta device, which allocates nothing, so an absurd width or
    stride in an edited config.json is refused before any real tensor is made."""
    layer_state = {k.removeprefix("layers."): v for k, v in state.items()
                   if k.startswith("layers.")}
    try:
        with torch.device("meta"):
            probe = build_layers(config["layers"], tuple(config["input_shape"]))
        probe.load_state_dict(layer_state, strict=True, assign=True)
    except Exception as err:  # whatever torch makes of an untrusted description
        raise CheckpointError(f"{directory}: the layers in config.json do not take the weights "
                              f"in {MODEL_FILE}: {_one_line(err)}"
                              ) from err


def load(directory: str | Path, device: str | torch.device = "cpu") -> CertifiedModel:
    """Rebuild a model from a checkpoint directory, or a committed model's name
    (:mod:`certnet.zoo`); never unpickles anything."""
    from certnet.zoo import resolve  # the zoo reads checkpoints: resolved at call time

    directory = resolve(directory)
    config = read_config(directory)
    weights = directory / MODEL_FILE
    try:
        blob = weights.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(f"{weights} is missing") from err
    if hashlib.sha256(blob).hexdigest() != config["model_sha256"]:
        raise CheckpointError(f"{weights} does not match config.json (corrupt, truncated or "
                              "from another checkpoint)")
    try:
        state = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights} is not a valid safetensors file: {err}") from err
    _check_fit(directory, config, state)
    try:
        shape = tuple(config["input_shape"])
        layers = build_layers(config["layers"], shape)
        model = get_method(config["method"])(layers, shape, config["num_classes"],
                                             **config.get("method_config", {}))
    except (CertnetError, RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{directory}: config.json describes no valid model: "
                              f"{_one_line(err)}") from err
    try:
        model.load_state_dict(state, strict=True)
    except (CertnetError, RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{directory}: weights do not fit the architecture in "
                              f"config.json: {_one_line(err)}") from err
    try:
        check_certifiable(model.layers)  # e.g. BatchNorm statistics with no sound affine map
    except UnsupportedLayerError as err:
        raise CheckpointError(f"{directory}: {err}") from err
    if config.get("norm") not in (None, model.norm):  # null: as if absent (same seal)
        raise CheckpointError(f"{directory}: config.json says norm {config['norm']!r}, but a "
                              f"{model.method} model is certified in {model.norm}")
    model.checkpoint_config = config
    return model.to(device).eval()


def save_train_state(directory: str | Path, epoch: int, tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any], keep: int = 1) -> Path:
    """Write the resumable state of ``epoch`` into ``DIR/state/epoch-NNNN`` atomically and
    drop older states beyond ``keep``."""
    root = Path(directory) / "state"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".epoch-*"):  # left by a process killed mid-write (one writer)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"epoch-{epoch:04d}"
    blob, sha256 = _tensor_blob(tensors)

    def write(folder: Path) -> None:
        atomic_write(folder / "state.safetensors", blob)
        write_json(folder / "state.json", {**meta, "epoch": epoch, "sha256": sha256})

    _write_directory(final, write)
    for old in sorted(root.glob("epoch-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest complete training state under ``DIR/state``."""
    root = Path(directory) / "state"
    candidates = sorted(root.glob("epoch-*"), reverse=True)
    if not candidates:
        raise CheckpointError(f"no training state to resume under {root}")
    path = candidates[0]
    try:
        meta = json.loads((path / "state.json").read_text())
        blob = (path / "state.safetensors").read_bytes()
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"training state {path} is unreadable: {err}") from err
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"training state {path} is corrupt (checksum mismatch)")
    return st_load(blob), meta

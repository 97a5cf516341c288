"""CIFAR-10 batches, binary (``cifar-10-batches-bin``) or python pickles
(``cifar-10-batches-py``), from a user-given directory."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from certnet.data.checksums import content_checksum
from certnet.data.load import Split
from certnet.errors import DataError


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 python batches (dicts of bytes, lists and numpy arrays) and refuses
    every other global, so a hostile file cannot run code."""

    ALLOWED = {(f"numpy.{core}.{mod}", fn) for core in ("core", "_core")
               for mod, fn in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = module.replace("numpy.core.", "numpy._core.")  # files from numpy 1.x
        return super().find_class(module, name)


def _read_cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072)
        return images, np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    except DataError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"CIFAR-10 batch {path} is corrupt: {err!r}") from err


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {err}") from err
    if raw.size % 3073:
        raise DataError(f"CIFAR-10 batch {path} is truncated ({raw.size} bytes is not a "
                        "multiple of 3073)")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:], raw[:, 0]


def load_cifar10(data_dir: Path | None, split: str) -> Split:
    """One split from ``data_dir`` or its ``cifar-10-batches-{bin,py}`` subdirectory."""
    if data_dir is None:
        raise DataError("CIFAR-10 has no download source here: pass --data-dir DIR pointing at "
                        "'cifar-10-batches-bin' (binary) or 'cifar-10-batches-py' (python) "
                        "from the official archive")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for sub in ("", "cifar-10-batches-bin", "cifar-10-batches-py"):
        d = data_dir / sub
        if all((d / f"{n}.bin").is_file() for n in names):
            batches = [_read_cifar_binary(d / f"{n}.bin") for n in names]
            break
        if all((d / n).is_file() for n in names):
            batches = [_read_cifar_python(d / n) for n in names]
            break
    else:
        raise DataError(f"no CIFAR-10 batches ({', '.join(names)}) found under {data_dir}")
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return images, labels, 10, content_checksum(images, labels)

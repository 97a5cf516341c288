"""Tiny-ImageNet from a user-given directory: the official ``tiny-imagenet-200`` tree (its
decoded JPEGs are cached as ``.npy`` in the user cache) or the GloRo code's ``.npy`` arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from certnet.data.cache import cache_dir, save
from certnet.data.checksums import content_checksum
from certnet.data.load import Split
from certnet.errors import DataError

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
    save({cached.name: images}, cached.parent)
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
    return images, np.asarray(labels), content_checksum(images, labels)


def load_tiny_imagenet(data_dir: Path | None, split: str) -> Split:
    """One split from the official tree or the GloRo .npy arrays in ``data_dir`` (or its
    ``tiny-imagenet-200`` subdirectory)."""
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
    return images.transpose(0, 3, 1, 2), labels, TINY_IMAGENET_CLASSES, checksum


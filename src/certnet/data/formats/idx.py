"""IDX files (the MNIST family), verified by md5, from ``--data-dir``, the user cache or a list
of sources tried in order."""

from __future__ import annotations

import gzip
import hashlib
import math
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from certnet.data.cache import cache_dir, save
from certnet.data.load import Split
from certnet.errors import DataError

#: (label, fetch): fetch(work directory) -> stem -> path of the files it found.
Source = tuple[str, Callable[[Path], dict[str, Path]]]


@dataclass(frozen=True)
class IdxFiles:
    """An IDX dataset (MNIST family): file stem -> md5 of the *uncompressed* file."""

    files: dict[str, str]
    mirrors: tuple[str, ...]
    fix: str  # how a user makes the dataset available, for error messages


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def from_dir(directory: Path, spec: IdxFiles) -> dict[str, Path]:
    """The files of ``spec`` present in ``directory`` (plain, gzipped or with a dot for the
    dash)."""
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


def load_idx(name: str, spec: IdxFiles, sources: list[Source], data_dir: Path | None,
             split: str) -> Split:
    """One split of the 10-class IDX dataset ``name``: from ``data_dir`` if given, else from the
    cache or the first source whose files all verify (then cached)."""
    prefix = "train" if split == "train" else "t10k"
    # a local copy is read and verified for this split only (certifying needs no training set);
    # a download is verified whole, as the cache keeps it whole
    needed = [stem for stem in spec.files if stem.startswith(prefix + "-")]
    if data_dir is not None:
        contents, problems = _read_verified(from_dir(data_dir, spec), spec, needed)
        if problems:
            raise DataError(f"{name}: --data-dir {data_dir} is not usable: {'; '.join(problems)}")
    else:
        target = cache_dir() / name
        tried = []
        cache = (f"cache {target}", lambda _: from_dir(target, spec), needed)
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
            save(contents, target)
    images, labels = (_parse_idx(contents[f"{prefix}-{kind}"], rank, f"{name} {prefix}-{kind}")
                      for kind, rank in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)))
    checksum = hashlib.md5("".join(spec.files.values()).encode()).hexdigest()
    return images[:, None], labels, 10, checksum

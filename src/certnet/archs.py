"""Registry of named architectures (timm style): ``build_layers(ARCHS[name](...))``, and of
initialisations (``INITS``), chosen by the method (or the config).

GloRo architectures (Leino et al. 2021, App. B; klasleino/gloro ``tools/training``): "same"
zero padding, an activation after every conv and hidden dense layer, orthogonal init.
Bound-propagation architectures (Gowal et al. 2018 DM-small/medium/large as used by CROWN-IBP,
Zhang et al. 2020; CNN7 of Shi et al. 2021): ReLU, BatchNorm in CNN7.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from certnet.errors import ConfigError
from certnet.nn.linf_dist import dist_layers, identity_init
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear
from certnet.nn.spec import LayerSpec, build_layers
from certnet.registry import Registry

ArchFn = Callable[..., list[LayerSpec]]
ARCHS: Registry[ArchFn] = Registry("architecture")
#: name -> function initialising freshly built layers in place ("default": PyTorch's own)
INITS: Registry[Callable[[nn.Sequential], None]] = Registry("init")


def register_arch(name: str) -> Callable[[ArchFn], ArchFn]:
    """Decorator: make an architecture function reachable by name."""
    return ARCHS.decorator(name)


#: Activations of the conv/dense architectures (spec types; clipped ones carry thresholds per
#: neuron, Huang et al. 2021).
ACTIVATIONS = ("minmax", "relu", "clipped-relu", "clipped-minmax")


def activation_spec(activation: str, shape: list[int]) -> LayerSpec:
    """The spec of ``activation`` for inputs of one point's ``shape``."""
    if activation.startswith("clipped-"):
        return {"type": activation.replace("-", "_"), "shape": shape}
    return {"type": activation}


def conv_mlp(input_shape: tuple[int, ...], num_classes: int, convs: list[tuple[int, ...]],
             dense: list[int], activation: str = "minmax", batchnorm: bool = False,
             normalize: list[list[float]] | None = None) -> list[LayerSpec]:
    """Conv stack (filters, kernel, stride[, padding]; padding defaults to TF "same"), then
    dense layers, then the logit layer; ``activation`` after every layer but the last, with
    BatchNorm before it if ``batchnorm``; ``normalize`` = [mean, std] per channel of the data
    puts the input normalisation inside the model, so eps and the [0, 1] box stay in pixels."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")
    channels, height, width = input_shape
    specs: list[LayerSpec] = _normalize(normalize)
    for filters, kernel, stride, *pad in convs:
        # TF "same": output = ceil(n / stride); symmetric padding (k - 1) // 2 gives it for
        # the kernels and even sizes used here.
        padding = pad[0] if pad else (kernel - 1) // 2 if stride == 1 else \
            (kernel - stride + 1) // 2
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
        specs += [{"type": "conv", "in_channels": channels, "out_channels": filters,
                   "kernel_size": kernel, "stride": stride, "padding": padding,
                   "bias": True},
                  *([{"type": "batchnorm2d", "num_features": filters}] if batchnorm else []),
                  activation_spec(activation, [filters, height, width])]
        channels = filters
    specs.append({"type": "flatten"})
    features = channels * height * width
    for units in dense:
        specs += [{"type": "linear", "in_features": features, "out_features": units,
                   "bias": True},
                  *([{"type": "batchnorm1d", "num_features": units}] if batchnorm else []),
                  activation_spec(activation, [units])]
        features = units
    specs.append({"type": "linear", "in_features": features, "out_features": num_classes,
                  "bias": True})
    return specs


#: GloRo's architectures (App. B): convs (filters, kernel, stride) and dense widths.
GLORO_ARCHS = {
    "2c2f": ([(16, 4, 2), (32, 4, 2)], [100]),
    "4c3f": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
    "6c2f": ([(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)], [512]),
    "8c2f": ([(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2),
              (256, 3, 1), (256, 4, 2)], [256]),
}


def _gloro_arch(convs: list[tuple[int, ...]], dense: list[int]) -> ArchFn:
    def arch(input_shape, num_classes, activation="minmax"):
        return conv_mlp(input_shape, num_classes, convs, dense, activation)
    return arch


for _name, (_convs, _dense) in GLORO_ARCHS.items():
    register_arch(_name)(_gloro_arch(_convs, _dense))


#: DM-small, DM-medium and DM-large (Gowal et al. 2018; CROWN-IBP, Zhang et al. 2020): convs
#: (filters, kernel, stride, padding) and dense widths; ``batchnorm`` adds BatchNorm before every
#: activation (Shi et al. 2021); ``normalize`` ([mean, std]) normalises the input inside the
#: model, as CROWN-IBP does on CIFAR-10.
DM_ARCHS = {
    "dm-small": ([(16, 4, 2, 0), (32, 4, 1, 0)], [100]),
    "dm-medium": ([(32, 3, 1, 0), (32, 4, 2, 0), (64, 3, 1, 0), (64, 4, 2, 0)], [512, 512]),
    "dm-large": ([(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)],
                 [512]),
}


def _dm_arch(convs: list[tuple[int, ...]], dense: list[int]) -> ArchFn:
    def arch(input_shape, num_classes, activation="relu", batchnorm=False, normalize=None):
        return conv_mlp(input_shape, num_classes, convs, dense, activation, batchnorm, normalize)
    return arch


for _name, (_convs, _dense) in DM_ARCHS.items():
    register_arch(_name)(_dm_arch(_convs, _dense))


@register_arch("cnn7")
def arch_cnn7(input_shape, num_classes, activation="relu", width: int = 64,
              linear_size: int = 512, normalize=None):
    """CNN7 (Shi et al. 2021, used by SABR, TAPS, MTL-IBP, CTRAIN): conv w, w, 2w/2, 2w, 2w
    (3x3, padding 1), FC ``linear_size``, BatchNorm before every ReLU."""
    return conv_mlp(input_shape, num_classes,
                    [(width, 3, 1, 1), (width, 3, 1, 1), (2 * width, 3, 2, 1),
                     (2 * width, 3, 1, 1), (2 * width, 3, 1, 1)], [linear_size], activation,
                    batchnorm=True, normalize=normalize)


def _normalize(normalize: list[list[float]] | None) -> list[LayerSpec]:
    return [] if normalize is None else \
        [{"type": "normalize", "mean": list(normalize[0]), "std": list(normalize[1])}]


def _dist_stack(features: int, depth: int, width: int) -> list[LayerSpec]:
    specs: list[LayerSpec] = []
    for _ in range(depth):
        specs += [{"type": "linf_dist", "in_features": features, "out_features": width,
                   "p": "inf", "bias": False},
                  {"type": "mean_shift", "num_features": width, "momentum": 0.1}]
        features = width
    return specs


@register_arch("linf-dist-mlp")
def arch_linf_dist_mlp(input_shape, num_classes, depth: int = 5, width: int = 5120,
                       normalize: list[list[float]] | None = None):
    """The l_inf-dist net (Zhang et al. 2021/2022): ``depth`` l_p-dist layers, a mean shift
    after each hidden one, a bias on the last, logits = -u; ``normalize`` = [mean, std] of the
    data (the papers normalise inputs)."""
    if depth < 2:
        raise ConfigError("linf-dist-mlp needs depth >= 2")
    pixels = math.prod(input_shape)
    return [*_normalize(normalize), {"type": "flatten"},
            *_dist_stack(pixels, depth - 1, width),
            {"type": "linf_dist", "in_features": width, "out_features": num_classes,
             "p": "inf", "bias": True},
            {"type": "negate"}]


@register_arch("linf-dist-hybrid")
def arch_linf_dist_hybrid(input_shape, num_classes, depth: int = 5, width: int = 5120,
                          hidden: int = 512, activation: str = "tanh",
                          normalize: list[list[float]] | None = None):
    """v2's hybrid (Zhang et al. 2022, §5): ``depth - 2`` l_p-dist layers with mean shifts, then
    an ordinary head linear(``hidden``), ``activation`` (tanh as in the paper, or relu),
    linear(classes), certified by bound propagation through the head."""
    if depth < 3:
        raise ConfigError("linf-dist-hybrid needs depth >= 3")
    if activation not in ("tanh", "relu"):
        raise ConfigError(f"unknown head activation {activation!r}; choose tanh or relu")
    pixels = math.prod(input_shape)
    return [*_normalize(normalize), {"type": "flatten"},
            *_dist_stack(pixels, depth - 2, width),
            {"type": "linear", "in_features": width, "out_features": hidden, "bias": True},
            {"type": activation},
            {"type": "linear", "in_features": hidden, "out_features": num_classes,
             "bias": True}]


def arch_specs(name: str, input_shape: tuple[int, ...], num_classes: int,
               **kwargs) -> list[LayerSpec]:
    return ARCHS[name](tuple(input_shape), num_classes, **kwargs)


def _affine(layers: nn.Sequential) -> list[nn.Module]:
    return [m for m in layers if isinstance(m, (LipschitzConv2d, LipschitzLinear))]


@INITS.decorator("orthogonal")
def orthogonal_init(layers: nn.Sequential) -> None:
    """Orthogonal weights (conv kernels as (out, in*k*k) matrices), zero biases."""
    for m in _affine(layers):
        nn.init.orthogonal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@INITS.decorator("ibp")
def ibp_init(layers: nn.Sequential) -> None:
    """IBP initialisation (Shi et al. 2021, §3.1): weights N(0, 2 pi / fan_in^2) for every
    affine layer but the last, so interval widths neither explode nor vanish at the start;
    the last layer and biases keep PyTorch's defaults."""
    for m in _affine(layers)[:-1]:
        fan_in = m.weight[0].numel()
        nn.init.normal_(m.weight, 0.0, math.sqrt(2 * math.pi) / fan_in)


@INITS.decorator("linf-dist")
def linf_dist_init(layers: nn.Sequential) -> None:
    """l_p-dist layers: N(0, 1) weights (their constructor) with v2's identity initialisation
    (:func:`certnet.nn.linf_dist.identity_init`); other layers keep PyTorch's defaults."""
    for m in dist_layers(layers):
        identity_init(m)


INITS.register("default", lambda layers: None)


def build_arch(name: str, input_shape: tuple[int, ...], num_classes: int,
               seed: int | None = None, init: str = "orthogonal", **kwargs) -> nn.Sequential:
    """Freshly initialised layers of a named architecture (``init`` names an ``INITS``
    entry)."""
    initialise = INITS[init]
    if seed is not None:
        torch.manual_seed(seed)
    layers = build_layers(arch_specs(name, input_shape, num_classes, **kwargs), input_shape)
    initialise(layers)
    return layers

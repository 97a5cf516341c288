"""Small random networks shared by the oracle and certifier tests."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from certnet.nn.activations import MinMax


def random_mlp(seed: int, d: int, widths: list[int], act: str, classes: int,
               gain: float = 1.0) -> nn.Sequential:
    """Flatten, [Linear, act] * len(widths), Linear with hidden weights times ``gain`` (so the
    kinks fall inside small balls); the global RNG is left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        modules: list[nn.Module] = [nn.Flatten()]
        prev = d
        for width in widths:
            linear = nn.Linear(prev, width)
            with torch.no_grad():
                linear.weight.mul_(gain)
                linear.bias.uniform_(-0.5 * gain, 0.5 * gain)
            modules += [linear, nn.ReLU() if act == "relu" else MinMax()]
            prev = width
        modules.append(nn.Linear(prev, classes))
        return nn.Sequential(*modules)


def random_cnn(seed: int, shape: tuple[int, int, int], channels: list[int], act: str,
               classes: int, gain: float = 1.0) -> nn.Sequential:
    """[Conv2d(kernel 2; padding 1 first, then stride 2), act] * len(channels), Flatten, Linear
    on inputs of ``shape`` (C, H, W), conv weights times ``gain``; the global RNG is left
    alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        modules: list[nn.Module] = []
        c, h, w = shape
        for i, out in enumerate(channels):
            conv = nn.Conv2d(c, out, 2, padding=1) if i == 0 else nn.Conv2d(c, out, 2, stride=2)
            with torch.no_grad():
                conv.weight.mul_(gain)
                conv.bias.uniform_(-0.5 * gain, 0.5 * gain)
            modules += [conv, nn.ReLU() if act == "relu" else MinMax()]
            c, h, w = out, *(n + 1 if i == 0 else n // 2 for n in (h, w))
        modules += [nn.Flatten(), nn.Linear(c * h * w, classes)]
        return nn.Sequential(*modules)


class _Affine:
    """z = A h + c composed lazily, flushed into an nn.Linear before each ReLU."""

    def __init__(self, dim: int) -> None:
        self.a = torch.eye(dim, dtype=torch.float64)
        self.c = torch.zeros(dim, dtype=torch.float64)

    def then(self, a: torch.Tensor, c: torch.Tensor | None = None) -> None:
        self.a, self.c = a @ self.a, a @ self.c + (0 if c is None else c)

    def flush(self) -> nn.Linear:
        linear = nn.Linear(self.a.shape[1], self.a.shape[0]).double()
        with torch.no_grad():
            linear.weight.copy_(self.a)
            linear.bias.copy_(self.c)
        self.a = torch.eye(self.a.shape[0], dtype=torch.float64)
        self.c = torch.zeros(self.a.shape[0], dtype=torch.float64)
        return linear


def linf_dist_as_relu(layers: nn.Sequential, shape: int | tuple[int, ...]) -> nn.Sequential:
    """An equivalent float64 Flatten / Linear / ReLU network (what the exact oracle reads) of an
    eval-mode l_inf-dist net at p = inf over inputs of ``shape`` (or ``d`` inputs): dense and
    conv distance layers, |t| = relu(t) + relu(-t) and, for a, b >= 0,
    max(a, b) = relu(b) + relu(a - b), pairwise down a tree."""
    from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dim = math.prod(shape)
    out: list[nn.Module] = [nn.Flatten()]
    pending = _Affine(dim)
    for m in layers:
        if isinstance(m, nn.Flatten):
            shape = (dim,)
            continue
        if type(m) in (LinfDist, LinfDistConv2d):
            w = m.weight.detach().double()
            if type(m) is LinfDist:
                positions = 1
                pick = torch.eye(m.in_features, dtype=torch.float64)[None]  # (1, n, dim)
                shape = (w.shape[0],)
            else:  # the patch entries each position reads (zero rows: padding)
                basis = torch.eye(dim, dtype=torch.float64).view(dim, *shape)
                unfolded = F.unfold(basis, m.kernel_size, padding=m.padding, stride=m.stride)
                pick = unfolded.permute(2, 1, 0)  # (positions, n, dim)
                positions = pick.shape[0]
                shape = (w.shape[0], *m.output_size(*shape[1:]))
            # neuron (o, position) in the output's channel-major order, then its n terms
            n = w.shape[1]
            k_out = w.shape[0] * positions
            rows = pick.expand(w.shape[0], -1, -1, -1).reshape(k_out * n, dim)
            offsets = w[:, None].expand(-1, positions, -1).reshape(-1)
            _abs_max_tree(pending, out, rows, offsets, k_out, n)
            if m.bias is not None:
                pending.then(torch.eye(k_out, dtype=torch.float64),
                             m.bias.detach().double().repeat_interleave(positions))
            dim = k_out
        elif type(m) is MeanShift:
            mean = m.running_mean.double().repeat_interleave(dim // m.running_mean.numel())
            pending.then(torch.eye(dim, dtype=torch.float64), -mean)
        elif type(m) is Negate:
            pending.then(-torch.eye(dim, dtype=torch.float64))
        else:
            raise TypeError(f"cannot convert {type(m).__name__}")
    out.append(pending.flush())
    return nn.Sequential(*out)


def _abs_max_tree(pending: _Affine, out: list[nn.Module], rows: torch.Tensor,
                  offsets: torch.Tensor, k_out: int, n: int) -> None:
    """Append max_i |rows_(o, i) . h - offsets_(o, i)| for each of ``k_out`` neurons of ``n``
    terms as Linear / ReLU layers (the pending affine map is their input)."""
    pending.then(torch.cat([rows, -rows]), torch.cat([-offsets, offsets]))
    out += [pending.flush(), nn.ReLU()]
    eye = torch.eye(k_out * n, dtype=torch.float64)
    pending.then(torch.cat([eye, eye], dim=1))  # |t_oi|, (o, i) order
    k = n
    while k > 1:
        pairs, odd = k // 2, k % 2
        width = 2 * pairs + odd
        split = torch.zeros(k_out * width, k_out * k, dtype=torch.float64)
        merge = torch.zeros(k_out * (pairs + odd), k_out * width, dtype=torch.float64)
        for o in range(k_out):
            for j in range(pairs):
                a, b = o * k + 2 * j, o * k + 2 * j + 1
                split[o * width + 2 * j, b] = 1  # b
                split[o * width + 2 * j + 1, a] = 1  # a - b
                split[o * width + 2 * j + 1, b] = -1
                merge[o * (pairs + odd) + j, o * width + 2 * j] = 1
                merge[o * (pairs + odd) + j, o * width + 2 * j + 1] = 1
            if odd:
                split[o * width + 2 * pairs, o * k + k - 1] = 1
                merge[o * (pairs + odd) + pairs, o * width + 2 * pairs] = 1
        pending.then(split)
        out += [pending.flush(), nn.ReLU()]
        pending.then(merge)
        k = pairs + odd

"""certnet.nn.branchless against torch: the same values and gradients, bit for bit, with ties,
NaN, infinities, signed zeros and broadcasting; torch's formula under create_graph; the torch
op itself under torch.func transforms."""

from __future__ import annotations

import pytest
import torch

from certnet.nn import branchless


def _inputs(dtype: torch.dtype, ties: bool, special: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 4, 5, 3, generator=g, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(4, 5, 3, generator=g, dtype=dtype)  # broadcast over the batch
    if ties:
        a[0, :2] = b[:2]
        a[3, 1, 2, 0] = b[1, 2, 0]
    if special:
        a[1, 0, 0, 0], a[1, 0, 0, 1] = float("nan"), float("inf")
        a[2, 3, 4, 2], b[3, 4, 2] = -0.0, 0.0
        b[0, 1, 1] = float("-inf")
    grad = torch.randn(6, 4, 5, 3, generator=g, dtype=dtype)
    grad[4, 0, 0, 0] = -0.0
    return a, b, grad


def _run(op, a, b, grad):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = op(a, b)
    out.backward(grad)
    return out, a.grad, b.grad


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and signed zeros included)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.shape == y.shape and torch.equal(x.contiguous().view(bits),
                                              y.contiguous().view(bits))


CASES = [(branchless.minimum, torch.minimum), (branchless.maximum, torch.maximum),
         (lambda a, b: branchless.clamp(a - b, min=0.0), lambda a, b: torch.clamp(a - b, min=0.0)),
         (lambda a, b: branchless.clamp(a * b, min=-0.5, max=0.25),
          lambda a, b: torch.clamp(a * b, min=-0.5, max=0.25)),
         (lambda a, b: branchless.clamp(a + b, max=0.0), lambda a, b: torch.clamp(a + b, max=0.0))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize(("ours", "theirs"), CASES)
def test_bitwise_equal_to_torch(ours, theirs, dtype, ties, special):
    a, b, grad = _inputs(dtype, ties, special)
    for mine, reference in zip(_run(ours, a, b, grad), _run(theirs, a, b, grad), strict=True):
        assert _same(mine, reference)


def test_one_side_without_grad_and_no_grad_mode():
    a, b, grad = _inputs(torch.float32, True, False)
    a = a.requires_grad_()
    branchless.minimum(a, b).backward(grad)
    reference = a.detach().clone().requires_grad_()
    torch.minimum(reference, b).backward(grad)
    assert _same(a.grad, reference.grad)
    with torch.no_grad():
        assert _same(branchless.maximum(a, b), torch.maximum(a, b))


@pytest.mark.parametrize("op", [branchless.minimum, branchless.maximum,
                                lambda a, b: branchless.clamp(a - b, min=0.1, max=0.9)])
def test_double_backward(op):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (a, b))
    assert torch.autograd.gradgradcheck(op, (a, b))


def test_torch_func_transforms_use_the_torch_op():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)

    def ours(x):
        return branchless.clamp(branchless.minimum(x, b), min=-0.5)

    def theirs(x):
        return torch.clamp(torch.minimum(x, b), min=-0.5)

    assert torch.equal(torch.func.jacrev(ours)(a), torch.func.jacrev(theirs)(a))
    assert torch.equal(torch.func.jacfwd(ours)(a), torch.func.jacfwd(theirs)(a))


def test_a_wrong_tie_rule_is_caught(monkeypatch):
    """The test above fails if ties route the whole gradient to one side."""
    a, b, grad = _inputs(torch.float32, True, False)

    def whole(grad, keep, tie, shape):
        routed = branchless.keep_bits(keep if tie is None else keep | tie, grad).view(grad.dtype)
        return routed.sum_to_size(shape) if routed.shape != shape else routed

    monkeypatch.setattr(branchless, "_route", whole)
    ours, theirs = _run(branchless.minimum, a, b, grad), _run(torch.minimum, a, b, grad)
    assert not all(_same(x, y) for x, y in zip(ours, theirs, strict=True))

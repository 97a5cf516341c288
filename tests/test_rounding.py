"""The float64 forward pass with its rounding bound (certnet.nn.rounding), run in cache-sized
chunks of points on the CPU: the GEMMs of a chunk may sum in another order than one pass over
the whole batch, a difference both passes' rounding bounds cover."""

from __future__ import annotations

import pytest
import torch

from certnet.archs import build_arch
from certnet.bounds.pairwise import SoundConstants
from certnet.methods.gloro import GloroNet
from certnet.nn import conv_algorithms
from certnet.nn.conv_algorithms import gemm_chunk
from certnet.nn.rounding import float64_forward

SHAPE = (1, 28, 28)


def _twin(arch: str = "2c2f"):
    net = GloroNet(build_arch(arch, SHAPE, 10, seed=0), SHAPE, 10).eval()
    return net.float64_copy("lipschitz", SoundConstants.of)


def test_chunk_holds_the_widest_im2col_buffer_within_budget():
    twin = _twin()
    x = torch.rand(500, *SHAPE, dtype=torch.float64)
    # 2C2F on 28x28: the second convolution unfolds 16 x 4 x 4 inputs at 7 x 7 positions
    assert gemm_chunk(twin.layers, x) == conv_algorithms.GEMM_CHUNK_ELEMENTS // (256 * 49)
    assert gemm_chunk(twin.layers, x[:1]) == 1
    assert gemm_chunk(twin.layers, x[:0]) == 1


@pytest.mark.parametrize("arch", ["2c2f", "4c3f"])
def test_chunked_pass_agrees_with_one_pass_within_the_rounding_bounds(monkeypatch, arch):
    twin = _twin(arch)
    x = torch.rand(37, *SHAPE, generator=torch.Generator().manual_seed(0))
    results = {}
    for budget in (2**40, 5 * 12544):  # every point at once; chunks of a few points
        monkeypatch.setattr(conv_algorithms, "GEMM_CHUNK_ELEMENTS", budget)
        outputs: list[torch.Tensor] = []
        logits, error = float64_forward(twin.layers, x, twin.derived.layers, outputs)
        results[budget] = (logits, error, outputs)
    (one_logits, one_error, one_outputs), (logits, error, outputs) = results.values()
    assert gemm_chunk(twin.layers, x.double()) < len(x)  # the second pass ran in chunks
    # both are within their bound of the exact logits, hence of each other
    assert ((logits - one_logits).norm(dim=1) <= error + one_error).all()
    assert (error > 0).all() and torch.allclose(error, one_error, rtol=1e-9, atol=0)
    assert len(outputs) == len(twin.layers)
    for a, b in zip(outputs, one_outputs, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_empty_batch_gives_empty_logits_and_errors():
    twin = _twin()
    logits, error = float64_forward(twin.layers, torch.rand(0, *SHAPE), twin.derived.layers)
    assert logits.shape == (0, 10) and error.shape == (0,)


def test_gemm_convolutions_switch_both_libraries_off_and_restore_them():
    """Inside, oneDNN and cuDNN are off (convolutions as im2col + GEMM, whose rounding the
    bounds cover); after, whatever they were, also when the body raises."""
    from certnet.nn.conv_algorithms import gemm_convolutions

    before = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    for outer in (True, False):
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = outer
        try:
            with gemm_convolutions():
                assert not torch.backends.mkldnn.enabled and not torch.backends.cudnn.enabled
                raise RuntimeError("inside")
        except RuntimeError:
            pass
        assert torch.backends.mkldnn.enabled == outer and torch.backends.cudnn.enabled == outer
        with gemm_convolutions(enabled=False):
            assert torch.backends.mkldnn.enabled == outer
    torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = before

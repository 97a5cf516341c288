"""The dense layer's backward product skips the outputs no coefficient reaches
(``live_product``): the same values as ``lam @ W``, weights of dead outputs never read, and
the full product wherever autograd records lam."""

import torch

from certnet.bounds.rules.affine import live_product


def _lam(dead: int, requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    lam = torch.randn(2, 5, 8, dtype=torch.float64)
    lam[..., :dead] = 0.0  # outputs behind dead ReLUs: zero for every point and row
    return lam.requires_grad_(requires_grad)


def test_equals_the_full_product_up_to_the_rounding_of_any_order():
    weight = torch.randn(8, 6, dtype=torch.float64)
    for dead in (0, 3, 6, 8):
        lam = _lam(dead)
        got, full = live_product(lam, weight), lam @ weight
        assert got.shape == full.shape
        bound = 16 * torch.finfo(torch.float64).eps * (lam.abs() @ weight.abs())
        assert ((got - full).abs() <= bound).all()


def test_weights_of_outputs_no_coefficient_reaches_are_never_read():
    weight = torch.randn(8, 6, dtype=torch.float64)
    weight[:6] = torch.nan  # read, they would make every entry NaN
    lam = _lam(6)
    assert torch.equal(live_product(lam, weight), lam[..., 6:] @ weight[6:])
    assert torch.equal(live_product(torch.zeros_like(lam), weight),
                       torch.zeros(2, 5, 6, dtype=torch.float64))


def test_more_than_half_live_and_recorded_coefficients_take_the_full_product():
    weight = torch.randn(8, 6, dtype=torch.float64)
    weight[:3] = torch.nan
    assert live_product(_lam(3), weight).isnan().all()  # 5 of 8 live: the full product
    weight[3] = torch.nan
    assert not live_product(_lam(4), weight).isnan().any()  # half: the live rows only
    # under autograd a zero coefficient may still move: its gradient needs every weight
    lam = _lam(6, requires_grad=True)
    weight = torch.randn(8, 6, dtype=torch.float64)
    live_product(lam, weight).sum().backward()
    assert torch.allclose(lam.grad[0, 0], weight.sum(1), rtol=0, atol=1e-12)
    assert (lam.grad[..., :6] != 0).all()  # the zero coefficients get their gradient

"""Full CROWN's shortcuts on dense layers. The backward product skips the outputs no
coefficient reaches (``live_product``): the same values as ``lam @ W``, weights of dead
outputs never read, and the full product wherever autograd records lam. The first step back
from a layer's neurons selects rows of W and b (``output_rows``) instead of multiplying one-hot
rows: the same bounds, the rigorous ones no looser (that step no longer rounds). |W| and its
row sums are computed once per walk (``fixed_weights``), carried into the next only in a
store the caller keeps (a float64 twin's); a
layer's quantities on an interval once per interval (``LayerInput.memo``); the drifts of
full CROWN's intervals are extended along its walk, not walked again."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.crown import affine_tail, backward_bound, backward_bounds, crown_walk
from certnet.bounds.ibp import drift_walk
from certnet.bounds.margins import margin_walk, spec_bounds
from certnet.bounds.rules import LayerInput
from certnet.bounds.rules.affine import ConvRule, LinearRule, live_product
from certnet.bounds.rules.fixed_weights import fixed_weights
from certnet.bounds.rules.relaxation import fits, relu_lines, relu_relaxation
from certnet.floats import round_down
from certnet.threat import BoxThreat, ThreatModel, box_minimum


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


def _net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("rigorous", [False, True])
def test_selected_rows_give_the_bounds_of_one_hot_rows(monkeypatch, rigorous):
    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    threat = ThreatModel("linf", 0.2)
    with torch.no_grad():
        fast, _ = crown_walk(net, x, threat, rigorous=rigorous)
        monkeypatch.setattr(LinearRule, "output_rows", lambda self, m, rows, inp: None)
        slow, _ = crown_walk(net, x, threat, rigorous=rigorous)
    _same_bounds_rigorous_ones_no_looser(fast, slow, rigorous)


def _same_bounds_rigorous_ones_no_looser(fast: list, slow: list, rigorous: bool) -> None:
    """Intervals with selected rows (``fast``) against those of one-hot rows: the same to
    1e-9, never looser, and (``rigorous``) somewhere strictly tighter: one step less to
    charge."""
    if rigorous:
        assert any((a.lo > b.lo).any() for a, b in zip(fast, slow, strict=True))
    for a, b in zip(fast, slow, strict=True):
        tol = 1e-12 * (1 + b.hi.abs().amax())
        assert (a.lo >= b.lo - tol).all() and (a.hi <= b.hi + tol).all()
        assert torch.allclose(a.lo, b.lo, rtol=0, atol=1e-9)
        assert torch.allclose(a.hi, b.hi, rtol=0, atol=1e-9)


def test_rows_are_exact_entries_and_only_of_flat_dense_layers():
    layer = nn.Linear(5, 4).double()
    rows = torch.tensor([3, 1])
    flat = LayerInput(*(torch.zeros(2, 5, dtype=torch.float64),) * 3)
    a, b = LinearRule().output_rows(layer, rows, flat)
    assert torch.equal(a, layer.weight[rows]) and torch.equal(b, layer.bias[rows])
    layer.bias = None
    assert torch.equal(LinearRule().output_rows(layer, rows, flat)[1], torch.zeros(2).double())
    deep = LayerInput(*(torch.zeros(2, 3, 5, dtype=torch.float64),) * 3)
    assert LinearRule().output_rows(layer, rows, deep) is None


def test_weight_quantities_are_kept_for_one_walk_only():
    layer = nn.Linear(4, 3).double().requires_grad_(False)
    rule = LinearRule()
    inp = LayerInput(*(torch.zeros(1, 4, dtype=torch.float64),) * 3)
    assert rule.abs_row_sums(layer, inp) is not rule.abs_row_sums(layer, inp)  # no walk
    with fixed_weights():
        kept = rule.abs_row_sums(layer, inp)
        with fixed_weights():  # an inner walk shares the outer one's
            assert rule.abs_row_sums(layer, inp) is kept
        assert rule.abs_weight(layer) is rule.abs_weight(layer)
    with fixed_weights():  # a new walk: computed again, from the weights as they are now
        with torch.no_grad():
            layer.weight.mul_(2)
        assert torch.equal(rule.abs_row_sums(layer, inp), 2 * kept)
    with fixed_weights():  # recorded by autograd: a graph per use, never kept
        layer.weight.requires_grad_(True)
        assert rule.abs_weight(layer) is not rule.abs_weight(layer)


def test_a_store_keeps_weight_quantities_across_walks():
    layer = nn.Linear(4, 3).double().requires_grad_(False)
    rule, store = LinearRule(), {}
    with fixed_weights(store):
        kept = rule.abs_weight(layer)
    with fixed_weights():  # another walk without the store: its own
        assert rule.abs_weight(layer) is not kept
    with fixed_weights(store):  # the store's again
        assert rule.abs_weight(layer) is kept
        with fixed_weights({}):  # an enclosing scope wins over an inner store
            assert rule.abs_weight(layer) is kept


def test_bounds_after_a_weight_update_are_those_of_the_new_weights():
    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    threat, ref = ThreatModel("linf", 0.2), torch.tensor([0, 1, 2])
    with torch.no_grad():
        margin_walk(net, x, threat, ref, "crown", rigorous=True)
        for p in net.parameters():
            p.mul_(1.5)
        after = margin_walk(net, x, threat, ref, "crown", rigorous=True)[0]
        fresh = margin_walk(copy.deepcopy(net), x, threat, ref, "crown", rigorous=True)[0]
    assert torch.equal(after, fresh)


def test_an_activation_on_the_input_has_no_layer_before_it_to_select_from(monkeypatch):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Sigmoid(), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double()
    x = torch.rand(2, 1, 3, 4, dtype=torch.float64)
    threat = ThreatModel("linf", 0.1)
    with torch.no_grad():
        fast, _ = crown_walk(net, x, threat, rigorous=True)
        monkeypatch.setattr(LinearRule, "output_rows", lambda self, m, rows, inp: None)
        slow, _ = crown_walk(net, x, threat, rigorous=True)
    assert torch.equal(fast[0].lo, slow[0].lo) and torch.equal(fast[0].hi, slow[0].hi)
    for a, b in zip(fast, slow, strict=True):
        assert (a.lo >= b.lo - 1e-12).all() and (a.hi <= b.hi + 1e-12).all()


def test_interval_quantities_are_kept_with_the_interval_and_never_under_autograd():
    """``LayerInput.memo``: a rule's quantity on an interval (a layer's size, its largest rho,
    ReLU's lines) is computed once per interval; a new (tightened) interval computes its own,
    and a value autograd records is never kept."""
    layer, rule = nn.Linear(4, 3).double().requires_grad_(False), LinearRule()
    inp = LayerInput(*(torch.full((2, 4), 0.5, dtype=torch.float64),) * 3)
    size = rule.size(layer, inp)
    assert rule.size(layer, inp) is size
    other = LayerInput(inp.lo * 2, inp.hi * 2, inp.clean)
    assert torch.equal(rule.size(layer, other) - layer.bias.abs(),
                       2 * (size - layer.bias.abs()))
    layer.requires_grad_(True)
    fresh = LayerInput(*(torch.full((2, 4), 0.5, dtype=torch.float64),) * 3)
    assert rule.size(layer, fresh) is not rule.size(layer, fresh)
    calls = []
    assert fresh.memo("k", lambda: calls.append(1) or 7) == 7
    assert fresh.memo("k", lambda: calls.append(1) or 8) == 7 and calls == [1]
    recorded = torch.ones(2, requires_grad=True) * 2  # a tuple holding a recorded tensor
    assert fresh.memo("t", lambda: (recorded, 1.0)) is not fresh.memo("t", lambda: (recorded, 1.0))


def test_relu_lines_are_the_relaxation_and_kept_only_for_fixed_slopes():
    lo = torch.tensor([[-1.0, 0.5, -2.0, -0.5]], dtype=torch.float64)
    inp = LayerInput(lo, lo + 1.5, lo)
    for slope in ("adaptive", "zero", "one", "same"):
        lines = relu_lines(inp, slope)
        assert relu_lines(inp, slope) is lines
        for a, b in zip(lines, relu_relaxation(inp.lo, inp.hi, slope), strict=True):
            assert torch.equal(a, b)
    alpha = torch.full((1, 2, 4), 0.3, dtype=torch.float64)
    assert relu_lines(inp, alpha) is not relu_lines(inp, alpha)


@pytest.mark.parametrize("seed", range(20))
def test_fits_is_broadcast_shapes_test(seed):
    gen = torch.Generator().manual_seed(seed)
    target = tuple(int(d) for d in torch.randint(1, 4, (int(torch.randint(0, 5, (1,),
                                                                          generator=gen)),),
                                                 generator=gen))
    for _ in range(20):
        n = int(torch.randint(0, 6, (1,), generator=gen))
        shape = tuple(int(d) for d in torch.randint(1, 4, (n,), generator=gen))
        try:
            same = torch.broadcast_shapes(shape, target) == target
        except RuntimeError:
            same = False
        assert fits(torch.Size(shape), torch.Size(target)) == same, (shape, target)


@pytest.mark.parametrize("rigorous", [False, True])
def test_crown_walks_drifts_are_those_of_its_intervals(rigorous):
    """The drifts full CROWN extends layer by layer as its intervals become final are
    drift_walk's on the intervals it returns, bit for bit (certificates subtract them)."""
    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    drifts = []
    with torch.no_grad():
        seen, _ = crown_walk(net, x, ThreatModel("linf", 0.2), rigorous=rigorous,
                             drifts=drifts)
        if not rigorous:
            assert drifts == []
            return
        expected = drift_walk(net, seen)
    assert len(drifts) == len(expected) == len(net) + 1
    for a, b in zip(drifts, expected, strict=True):
        assert torch.equal(a, b)


def test_rounding_down_to_the_same_dtype_is_the_value_itself():
    value = torch.tensor([0.1, -0.3, 1e-310], dtype=torch.float64)
    assert round_down(value, torch.float64) is value
    down = round_down(value, torch.float32)
    assert (down.double() <= value).all() and down.dtype == torch.float32


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, (3, 3)), (2, 1, (3, 3)),
                                                   (2, 0, (2, 3)), (1, 2, (3, 2)),
                                                   (3, 1, (4, 4))])
def test_conv_rows_are_the_kernel_on_each_window_exactly(stride, padding, kernel):
    """A convolution's selected rows are exactly the transposed convolution of one-hot rows
    (a product with 1 and sums of zeros: exact), for strides, paddings and kernels that leave
    the window partly on the padding or the last input rows unused."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding).double()
    inp = LayerInput(*(torch.zeros(1, 2, 7, 6, dtype=torch.float64),) * 3)
    out_shape = conv(inp.lo).shape[1:]
    rule = ConvRule()
    rows = torch.randperm(out_shape.numel())[:12]
    a, b = rule.output_rows(conv, rows, inp)
    unit = torch.zeros(1, len(rows), out_shape.numel(), dtype=torch.float64)
    unit[0, torch.arange(len(rows)), rows] = 1.0
    with torch.no_grad():
        expected = rule.transpose(conv, unit.view(1, len(rows), *out_shape), inp)[0]
    assert torch.equal(a, expected)
    assert torch.equal(b, conv.bias[rows // out_shape[1:].numel()])
    assert rule.output_rows(conv, rows, LayerInput(*(torch.zeros(1, 84),) * 3)) is None


def _residual() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3 * 6 * 6, 4)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.conv(h))
            return self.head(torch.flatten(h, 1))
    torch.manual_seed(4)
    return Net().double().eval()


@pytest.mark.parametrize("rigorous", [False, True])
def test_selected_rows_through_graph_steps_and_convolutions_give_the_same_bounds(
        monkeypatch, rigorous):
    """On a residual graph (torch.fx, lowered to steps) the first step back from a layer's
    neurons selects the convolution's rows inside the step: the bounds of one-hot rows, the
    rigorous ones no looser and somewhere strictly tighter (that step no longer rounds)."""
    import certnet
    from certnet.bounds import crown as crown_module
    from certnet.bounds.rules.graph_step import StepRule

    net = certnet.bounded(_residual(), (1, 6, 6)).layers
    # l2: the stem's neurons get a pass too (over a box their interval is already exact)
    x, threat = torch.rand(2, 1, 6, 6, dtype=torch.float64), ThreatModel("l2", 0.5)
    monkeypatch.setattr(crown_module, "patch_plan", lambda *args: None)
    with torch.no_grad():
        fast, _ = crown_walk(net, x, threat, rigorous=rigorous)
        monkeypatch.setattr(StepRule, "output_rows", lambda self, m, rows, inp: None)
        slow, _ = crown_walk(net, x, threat, rigorous=rigorous)
    _same_bounds_rigorous_ones_no_looser(fast, slow, rigorous)


def test_a_computed_kernel_is_never_selected_as_exact_rows():
    """The folded residual conv's kernel alpha W + I is computed (it rounds): its rows are
    never handed out as exact entries."""
    from certnet.bounds.rules.affine import ResidualConvRule

    inp = LayerInput(*(torch.zeros(1, 2, 5, 5, dtype=torch.float64),) * 3)
    assert ResidualConvRule().output_rows(None, torch.tensor([0, 1]), inp) is None


@pytest.mark.parametrize("rigorous", [False, True])
def test_each_point_carries_only_its_own_unstable_neurons(monkeypatch, rigorous):
    """On full maps each point's backward passes carry only the neurons IBP left unstable for
    it (``mine``): the bounds of those are the ones computed for every row, and full CROWN's
    intervals of a point are those it gets alone."""
    from certnet.bounds import crown as crown_module
    from certnet.bounds.crown import _neuron_bounds
    from certnet.bounds.ibp import interval_walk

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    monkeypatch.setattr(crown_module, "patch_plan", lambda *args: None)
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    x[0] = 0.0  # different points, different unstable sets
    threat = ThreatModel("linf", 0.08)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat, rigorous=rigorous)
        unstable = (seen[3].lo < 0) & (seen[3].hi > 0)
        unstable = unstable.flatten(1)
        rows = unstable.any(0).nonzero().squeeze(1)
        mine = unstable[:, rows]
        assert not mine.all() and mine.sum(1).max() < len(rows)  # the case this is about
        every = _neuron_bounds(net, seen, x, threat, "adaptive", 3, rows, rigorous)
        own = _neuron_bounds(net, seen, x, threat, "adaptive", 3, rows, rigorous, mine)
        for a, b in zip(own, every, strict=True):
            assert torch.allclose(a[mine], b[mine], rtol=0, atol=1e-12)
        together, _ = crown_walk(net, x, threat, rigorous=rigorous)
        for p in range(len(x)):
            alone, _ = crown_walk(net, x[p:p + 1], threat, rigorous=rigorous)
            for a, b in zip(alone, together, strict=True):
                assert torch.allclose(a.lo, b.lo[p:p + 1], rtol=0, atol=1e-12)
                assert torch.allclose(a.hi, b.hi[p:p + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_neurons_one_affine_map_from_the_input_box_keep_their_intervals(monkeypatch, norm):
    """Over an l_inf box the interval of a layer that is one affine map (behind reshapes and
    diagonal maps) of the input is already its exact range: full CROWN runs no pass for it,
    and every other interval is within rounding of those with the pass. Over an l2 ball the
    pass runs (its dual norm can be tighter than the intervals' ball bound)."""
    from certnet.bounds import crown as crown_module
    from certnet.nn.lipschitz import Normalize

    torch.manual_seed(12)
    net = nn.Sequential(Normalize([0.3], [0.7]), nn.Flatten(), nn.Linear(12, 10), nn.ReLU(),
                        nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, threat = torch.rand(3, 1, 3, 4, dtype=torch.float64), ThreatModel(norm, 0.2)
    passes = []
    bounds = crown_module._neuron_bounds

    def spy(layers, seen, x, threat, slope, upto, *args):
        passes.append(upto)
        return bounds(layers, seen, x, threat, slope, upto, *args)
    monkeypatch.setattr(crown_module, "_neuron_bounds", spy)
    with torch.no_grad():
        fast, _ = crown_walk(net, x, threat, rigorous=True)
        assert passes == ([5] if norm == "linf" else [3, 5])
        monkeypatch.setattr(crown_module, "_range_by_intervals", lambda *args: False)
        slow, _ = crown_walk(net, x, threat, rigorous=True)
    for a, b in zip(fast, slow, strict=True):
        assert torch.allclose(a.lo, b.lo, rtol=0, atol=1e-12)
        assert torch.allclose(a.hi, b.hi, rtol=0, atol=1e-12)


def test_graph_steps_report_range_intervals_and_boxes_of_their_operator():
    """A lowered graph's steps delegate the two capabilities to their operator: the stem
    convolution's neurons keep their interval over a box; a join (Add) has neither."""
    import certnet
    from certnet.bounds.crown import _range_by_intervals
    from certnet.bounds.rules import rule_for

    net = list(certnet.bounded(_residual(), (1, 6, 6)).layers)
    ops = [type(m.op).__name__ for m in net]
    assert ops[:4] == ["Conv2d", "ReLU", "Conv2d", "Add"]
    assert _range_by_intervals(net, ThreatModel("linf", 0.1), 1)
    assert not _range_by_intervals(net, ThreatModel("l2", 0.1), 1)
    assert not _range_by_intervals(net, ThreatModel("linf", 0.1), 4)  # behind a ReLU, an Add
    assert not rule_for(net[3]).has_range_interval(net[3])
    assert not rule_for(net[3]).maps_boxes_to_boxes(net[3])
    assert rule_for(net[0]).has_range_interval(net[0])
    assert not rule_for(net[0]).maps_boxes_to_boxes(net[0])  # a convolution mixes inputs


@pytest.mark.parametrize("rigorous", [False, True])
def test_passes_to_several_stops_share_their_steps_bit_for_bit(rigorous):
    """backward_bounds: each stop's bound is the one its own pass gives (the shared steps
    are the same arithmetic), duplicate stops included and a stop at the top."""
    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    threat = ThreatModel("linf", 0.1)
    seen, _ = crown_walk(net, x, threat, rigorous=rigorous)
    spec = torch.randn(3, 4, seen[-1].lo.shape[1], dtype=torch.float64)
    stops = [len(net), affine_tail(net), 3, 0, 3]
    with torch.no_grad():
        together = backward_bounds(net, seen, spec, x, threat, stops, rigorous=rigorous)
        for stop, bound in zip(stops, together, strict=True):
            alone = backward_bound(net, seen, spec, x, threat, stop=stop, rigorous=rigorous)
            assert torch.equal(bound, alone), stop
    assert not torch.equal(together[1], together[3])  # the stops do differ


@pytest.mark.parametrize("rigorous", [False, True])
def test_a_walk_without_its_clean_pass_gives_the_same_intervals(monkeypatch, rigorous):
    """``with_clean=False`` (a specification's bound, a margin against a given class) runs
    no clean pass, and the intervals, chunked into one point at a time too, are bit for
    bit the walk's with the clean pass."""
    from certnet.bounds import crown as crown_module

    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    threat = ThreatModel("linf", 0.1)
    monkeypatch.setattr(crown_module, "CHUNK_ELEMENTS", 1)  # one point per chunk
    calls = []  # the clean pass starts with the first layer on x itself
    hook = net[0].register_forward_hook(lambda m, args, out: calls.append(args[0] is x))
    with torch.no_grad():
        full, clean = crown_walk(net, x, threat, rigorous=rigorous)
        assert any(calls)  # the hook sees a clean pass
        calls.clear()
        bare, none = crown_walk(net, x, threat, rigorous=rigorous, with_clean=False)
        spec = torch.randn(3, 2, full[-1].lo.shape[1], dtype=torch.float64)
        spec_bounds(net, x, threat, spec, "crown", rigorous=rigorous)
    hook.remove()
    assert clean is not None and none is None and not any(calls)
    assert all(s.clean is None for s in bare)
    assert all(torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
               for a, b in zip(full, bare, strict=True))


def test_a_dense_interval_reads_only_the_weights_its_other_steps_read():
    """A dense layer's interval is IBP's centre/radius form on W and |W|: the same interval as
    the halved weights' (within one rounding of each end, any order), with no weight-sized
    matrix kept beyond W itself and |W|, which its backward steps and drift read."""
    from certnet.floats import gamma

    g = torch.Generator().manual_seed(3)
    m = nn.Linear(7, 5).double()
    lo = torch.randn(3, 7, generator=g, dtype=torch.float64)
    inp = LayerInput(lo, lo + torch.rand(3, 7, generator=g, dtype=torch.float64), lo)
    store: dict = {}
    with torch.no_grad(), fixed_weights(store):
        got = LinearRule().interval(m, inp)
        half = F.linear(inp.hi + inp.lo, m.weight * 0.5, m.bias)
        r = F.linear(inp.hi - inp.lo, m.weight.abs() * 0.5)
        size = F.linear(torch.maximum(inp.lo.abs(), inp.hi.abs()), m.weight.abs(),
                        m.bias.abs())
    for a, b in zip(got, (half - r, half + r), strict=True):
        assert ((a - b).abs() <= 4 * gamma(10) * size).all()
    assert [name for _, name in store] == ["abs_weight"]


def test_a_box_threat_computes_its_terms_once_and_gives_box_minimum_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    lo = torch.rand(3, 5, 5, generator=generator, dtype=torch.float64)
    threat = BoxThreat.of(lo, lo + torch.rand(3, 5, 5, generator=generator, dtype=torch.float64))
    x = threat.center().expand(4, -1, -1, -1)
    lam = torch.randn(4, 7, 3, 5, 5, generator=generator, dtype=torch.float64)
    for rigorous in (False, True):
        box = threat.enclosure(x) if rigorous else threat.box(x)
        first = threat.concretize(x, lam, rigorous)
        assert torch.equal(first, box_minimum(lam, *box, rigorous))
        kept = dict(threat._kept)
        assert torch.equal(threat.concretize(x, lam, rigorous), first)
        assert all(threat._kept[k] is v for k, v in kept.items())  # nothing recomputed
    # the float32 enclosure is its own entry, rounded outward from the float64 box
    lo32, hi32 = threat.enclosure(x.float())
    assert lo32.dtype == torch.float32 and (lo32.double() <= threat.lo).all() and \
        (hi32.double() >= threat.hi).all()


def test_exact_inputs_drift_without_a_product_bit_for_bit(monkeypatch):
    """An affine layer on exact inputs (zero drift) skips |A| 0: the drifts are those of
    the product, and a layer whose own term is not full-shaped (a conv's) takes the product."""
    net, x = _net(), torch.rand(3, 1, 3, 4, dtype=torch.float64)
    seen, _ = crown_walk(net, x, ThreatModel("linf", 0.1), rigorous=True)
    with torch.no_grad():
        fast = drift_walk(net, seen)
        monkeypatch.setattr(LinearRule, "outputs", lambda self, m, inp: -1)  # never skips
        slow = drift_walk(net, seen)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert not fast[2].eq(0).any()  # the first Linear's own rounding is there
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    inp = LayerInput(*(torch.rand(2, 1, 4, 4, dtype=torch.float64),) * 3)
    with torch.no_grad():
        assert ConvRule().drift(conv, torch.zeros_like(inp.lo), inp).shape == (2, 2, 4, 4)


@pytest.mark.parametrize("kernel, padding, stride", [
    (3, 1, 1), (3, 0, 1), (5, 2, 1), (1, 0, 1), ((3, 5), (1, 2), 1), (3, 3, 1), (3, 1, 2)])
def test_a_float64_stride_one_transpose_is_the_flipped_convolution(kernel, padding, stride):
    """ConvRule.transpose in float64 at stride 1 (padding at most the kernel's size - 1): the
    convolution with the flipped, transposed kernel, within the rounding of any summation
    order of the transposed convolution's products; elsewhere the transposed convolution."""
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding).double()
    inp = LayerInput(*(torch.zeros(2, 3, 9, 8, dtype=torch.float64),) * 3)
    out = conv(inp.lo)
    lam = torch.randn(2, 5, *out.shape[1:], dtype=torch.float64)
    rule = ConvRule()
    got = rule.transpose(conv, lam, inp)
    flat = lam.reshape(-1, *lam.shape[2:])
    extra = tuple(i - ((o - 1) * s - 2 * p + k) for i, o, s, p, k in zip(
        (9, 8), out.shape[-2:], conv.stride, conv.padding, conv.weight.shape[-2:], strict=True))

    def transposed(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv_transpose2d(
            c, w, None, conv.stride, conv.padding, output_padding=extra).view_as(got)
    terms = conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3]
    bound = 2 * terms * 2.0**-53 * transposed(flat.abs(), conv.weight.abs())
    assert ((got - transposed(flat, conv.weight)).abs() <= bound).all()
    flips = ConvRule.flipped_padding(conv, conv.weight) is not None
    assert flips == (stride == 1 and padding != 3)

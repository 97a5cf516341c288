"""certnet.properties: VNN-LIB 1.0 properties, VNN-COMP result and instance files, exactly.

Real files no one here wrote (/work/shared/benchmarks/vnncomp, see its README) must parse with
the right counts; written files read back equal; tensors round soundly; a counterexample is
checked in exact arithmetic; bad input gives one PropertyError naming file:line:column."""

from __future__ import annotations

import functools
import math
import os
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certnet.errors import InputError, PropertyError
from certnet.properties import (
    Box,
    Case,
    Property,
    Row,
    format_vnnlib,
    linf_robustness,
    parse_vnnlib,
    read_instances,
    read_result,
    read_vnnlib,
    write_result,
    write_vnnlib,
)
from certnet.properties import vnnlib as vnnlib_module
from certnet.properties.exact import decimal_text, round_down, round_up
from certnet.properties.results import format_result

SHARED = Path("/work/shared/benchmarks/vnncomp")
MNIST_FC = sorted((SHARED / "mnist_fc" / "vnnlib").glob("*.vnnlib"))
ERAN = sorted((SHARED / "eran" / "specs" / "mnist").glob("*.vnnlib"))
needs_shared = pytest.mark.skipif(not MNIST_FC or not ERAN, reason="no shared VNN-COMP files")
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def _read(path: Path) -> Property:
    return read_vnnlib(path)


def _label(prop: Property) -> int:
    """The class every disjunct ``Y_j >= Y_label`` compares against."""
    (case,) = prop.cases
    common = set.intersection(*({j for j, c in row.terms if c == 1} for (row,) in case.violation))
    assert len(common) == 1
    return common.pop()


# ---- real files ---------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("path", MNIST_FC + ERAN, ids=lambda p: p.name)
def test_shared_files_parse_with_the_right_counts(path):
    prop = _read(path)
    assert (prop.n_inputs, prop.n_outputs, len(prop.cases)) == (784, 10, 1)
    (case,) = prop.cases
    assert len(case.violation) == 9 and all(len(conj) == 1 for conj in case.violation)
    label = _label(prop)
    assert sorted(j for (row,) in case.violation for j, c in row.terms if c == -1) == \
        [j for j in range(10) if j != label]
    assert all(row.rhs == 0 and not row.strict for (row,) in case.violation)
    # clip([x - eps, x + eps], 0, 1): widths up to 2 eps; the files' decimals are float32
    # sums (mnist_fc) or 8-digit roundings (eran), hence the tolerance
    eps = Fraction(re.search(r"_(0\.\d+)\.vnnlib$", path.name).group(1))
    box = case.box
    widths = [hi - lo for lo, hi in zip(box.lo, box.hi, strict=True)]
    assert abs(max(widths) - 2 * eps) <= Fraction(2**-23)
    assert min(box.lo) >= 0 and max(box.hi) <= 1
    lo, hi = prop.box_tensors()
    assert lo.dtype == torch.float64 and bool((lo <= hi).all())
    (c, d), *_ = prop.violation_tensors()
    assert c.shape == (1, 10) and d.tolist() == [0.0]
    first = path.read_text().splitlines()[0]
    if "label:" in first:  # mnist_fc names the label in its first comment
        assert int(re.search(r"label: (\d+)", first).group(1)) == label


@needs_shared
def test_read_instances_of_both_csv_files():
    fc = read_instances(SHARED / "mnist_fc" / "instances.csv")
    assert len(fc) == 90 and {i.timeout_s for i in fc} == {120.0, 300.0}
    assert all(i.onnx.exists() and i.vnnlib.exists() for i in fc)
    eran = read_instances(SHARED / "eran" / "eran_instances_mnist_relu_9_200_all.csv")
    assert len(eran) == 36 and {i.timeout_s for i in eran} == {300.0}
    # the full instance list of the network; only 10 of its specs are in the shared folder
    assert sum(i.vnnlib.exists() for i in eran) == len(ERAN) == 10
    assert all(i.onnx.exists() for i in eran)


@needs_shared
def test_a_784_input_file_reads_fast():
    text = MNIST_FC[0].read_bytes()
    best = min(_timed(lambda: read_vnnlib(text)) for _ in range(3))
    assert best < 0.5  # ~30-60 ms here; generous for a loaded machine


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_large_generated_files_read(tmp_path):
    x = torch.rand(3072, dtype=torch.float64)
    big = linf_robustness(x, 8 / 255, 3, 10)
    path = tmp_path / "cifar.vnnlib"
    write_vnnlib(path, big)
    start = time.perf_counter()
    assert read_vnnlib(path) == big
    assert time.perf_counter() - start < 3  # ~0.25 s here
    rows = "\n".join(f"  (and (<= (- Y_0 Y_1) {k}.5))" for k in range(10_000))
    text = ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
            f"(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (or\n{rows}\n))\n")
    start = time.perf_counter()
    prop = parse_vnnlib(text)
    assert time.perf_counter() - start < 5  # ~1 s of CPU here
    assert len(prop.cases) == 1 and len(prop.cases[0].violation) == 10_000
    assert prop.cases[0].violation[-1][0].rhs == Fraction(19999, 2)


# ---- semantics ----------------------------------------------------------------------------
HEAD = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n" \
       "(declare-const Y_1 Real)\n"
BOX = "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n(assert (>= X_1 0))\n"


def test_numbers_are_exact_in_every_spelling():
    prop = parse_vnnlib(HEAD + "(assert (>= X_0 -0.5)) (assert (<= X_0 (- 1e-5)))\n"
                        "(assert (>= X_1 (- 0.5))) (assert (<= X_1 2))\n(assert (<= Y_0 0.1))")
    box = prop.cases[0].box
    assert box.lo == (Fraction(-1, 2), Fraction(-1, 2))
    assert box.hi == (Fraction(-1, 100000), Fraction(2))
    assert prop.cases[0].violation[0][0].rhs == Fraction(1, 10)


def test_linear_terms_normalise_to_le_rows():
    prop = parse_vnnlib(HEAD + BOX + "(assert (>= (+ (* 2 Y_0) 1) (- Y_1 (* 0.5 Y_0) -3)))")
    # 2 y0 + 1 >= y1 - 0.5 y0 + 3  <=>  -2.5 y0 + y1 <= -2
    ((row,),) = prop.cases[0].violation
    assert row.terms == ((0, Fraction(-5, 2)), (1, Fraction(1))) and row.rhs == -2


def test_equality_is_two_inequalities_and_a_point_box():
    prop = parse_vnnlib(HEAD + "(assert (= X_0 0.25)) (assert (<= X_1 1)) (assert (>= X_1 0))"
                        "(assert (= Y_0 Y_1))")
    assert prop.cases[0].box.lo[0] == prop.cases[0].box.hi[0] == Fraction(1, 4)
    ((a, b),) = prop.cases[0].violation
    assert a.terms == ((0, 1), (1, -1)) and b.terms == ((0, -1), (1, 1))


def test_strict_inequalities_are_exact_here_and_closed_in_tensors():
    prop = parse_vnnlib(HEAD + "(assert (< X_0 1)) (assert (> X_0 0)) (assert (<= X_1 1))"
                        "(assert (>= X_1 0)) (assert (< Y_0 Y_1))")
    assert prop.cases[0].box.open_hi == {0} and prop.cases[0].box.open_lo == {0}
    lo, hi = prop.box_tensors()
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == [1.0, 1.0]
    assert prop.cases[0].violation[0][0].strict
    assert prop.check_counterexample([0.5, 0.5], [0.0, 1.0])
    assert not prop.check_counterexample([1.0, 0.5], [0.0, 1.0])  # X_0 < 1 is strict
    assert not prop.check_counterexample([0.5, 0.5], [1.0, 1.0])  # Y_0 < Y_1 is strict


def test_several_boxes_and_mixed_disjuncts_become_cases():
    acas = HEAD + """(assert (or
        (and (>= X_0 0) (<= X_0 0.5) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_1))
        (and (>= X_0 0.5) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_1 -2))
        (and (>= X_0 0) (<= X_0 0.5) (>= X_1 0) (<= X_1 1) (>= Y_0 3))
    ))"""
    prop = parse_vnnlib(acas)
    assert len(prop.cases) == 2  # the first and third share a box
    assert [len(c.violation) for c in prop.cases] == [2, 1]
    assert prop.cases[1].box.lo[0] == Fraction(1, 2)
    assert parse_vnnlib(format_vnnlib(prop)) == prop
    boxes = HEAD + "(assert (<= X_1 1)) (assert (>= X_1 0)) (assert (or (and (>= X_0 0) " \
        "(<= X_0 0.5)) (and (>= X_0 0.5) (<= X_0 1)))) (assert (or (>= Y_0 1) (>= Y_1 1)))"
    prop = parse_vnnlib(boxes)
    assert [len(c.violation) for c in prop.cases] == [2, 2]


def test_robustness_property_has_the_mnist_shape():
    x = torch.tensor([0.0, 0.5, 1.0, 0.1])
    prop = linf_robustness(x, 0.25, 2, 5)
    box = prop.cases[0].box
    assert box.lo == (0, Fraction(1, 4), Fraction(3, 4), Fraction(0))
    assert box.hi[3] == Fraction(float(torch.tensor(0.1))) + Fraction(1, 4)
    text = format_vnnlib(prop, "robustness, label 2")
    assert "(>= Y_0 Y_2)" in text and text.startswith("; robustness, label 2\n")
    assert parse_vnnlib(text) == prop and _label(prop) == 2
    with pytest.raises(InputError):
        linf_robustness(torch.tensor([1.5]), 0.1, 0, 2)


# ---- rounding -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["0.1", "0.3", "-0.7", "1e-5", "0.029999999329447746"])
def test_outward_rounding_of_a_decimal_between_two_floats(text):
    q = Fraction(text)
    assert Fraction(float(q)) != q  # really between two floats
    prop = parse_vnnlib(f"(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 {text}))"
                        f"(assert (<= X_0 {text}))(assert (<= Y_0 {text}))")
    lo, hi = (t.item() for t in prop.box_tensors())
    assert Fraction(lo) < q < Fraction(hi) and math.nextafter(lo, math.inf) == hi
    (_, d), = prop.violation_tensors()
    assert d.item() == hi  # d rounds up, like hi


@pytest.mark.parametrize("text", ["0.5", "0", "-3.25", "0.0299999993294477462768554687500"])
def test_an_exact_float_stays(text):
    prop = parse_vnnlib(f"(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 {text}))"
                        f"(assert (<= X_0 {text}))(assert (<= Y_0 {text}))")
    lo, hi = (t.item() for t in prop.box_tensors())
    assert lo == hi == float(Fraction(text)) and Fraction(lo) == Fraction(text)


@given(st.fractions(max_denominator=10**30))
def test_directed_rounding_brackets_every_rational(q):
    down, up = round_down(q), round_up(q)
    assert Fraction(down) <= q <= Fraction(up)
    assert down == up or math.nextafter(down, math.inf) == up


def test_a_coefficient_that_is_not_a_float_is_refused():
    prop = parse_vnnlib(HEAD + BOX + "(assert (<= (* 0.1 Y_0) Y_1))")
    with pytest.raises(PropertyError, match=r"<text>:9:9: the coefficient 1/10 .* refuses"):
        prop.violation_tensors()


# ---- counterexamples ----------------------------------------------------------------------
def test_check_counterexample_is_exact():
    prop = parse_vnnlib(HEAD.replace("Y_1 Real)", "Y_1 Real)(declare-const Y_2 Real)") + BOX
                        + "(assert (or (and (>= Y_1 Y_0)) (and (<= (+ Y_0 Y_1 Y_2) 0))"
                        " (and (<= Y_2 0.1) (>= Y_2 0))))")
    assert prop.check_counterexample([0.0, 1.0], [0.0, 1.0, 5.0])  # inside, Y_1 >= Y_0
    assert prop.check_counterexample(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
    outside = math.nextafter(1.0, 2.0)
    assert not prop.check_counterexample([0.5, outside], [0.0, 1.0, 5.0])  # one ulp out
    assert not prop.check_counterexample([-5e-324, 0.5], [0.0, 1.0, 5.0])
    assert not prop.check_counterexample([0.5, 0.5], [1.0, 0.0, 5.0])  # no disjunct holds
    # float arithmetic gets both of these wrong: 1e16 + 1 - 1e16 == 0.0 in float64, and
    # float(0.1) <= float(0.1) although float(0.1) > 1/10
    y = [1e16, 1.0, -1e16]
    assert (y[0] + y[1]) + y[2] <= 0 and not prop.check_counterexample([0.5, 0.5], y)
    assert 0.1 <= 0.1 and not prop.check_counterexample([0.5, 0.5], [1.0, 0.0, 0.1])
    assert prop.check_counterexample([0.5, 0.5], [1.0, 0.0, math.nextafter(0.1, 0)])
    assert not prop.check_counterexample([math.nan, 0.5], [0.0, 1.0, 5.0])
    with pytest.raises(InputError):
        prop.check_counterexample([0.5], [0.0, 1.0, 5.0])


def test_check_counterexample_pairs_the_box_with_its_own_disjuncts():
    prop = parse_vnnlib(HEAD + """(assert (or
        (and (>= X_0 0) (<= X_0 0.5) (>= X_1 0) (<= X_1 1) (>= Y_0 1))
        (and (>= X_0 0.5) (<= X_0 1) (>= X_1 0) (<= X_1 1) (>= Y_1 1))))""")
    assert prop.check_counterexample([0.25, 0.0], [1.0, 0.0])
    assert not prop.check_counterexample([0.75, 0.0], [1.0, 0.0])  # Y_0 >= 1 is the 1st box's
    assert prop.check_counterexample([0.75, 0.0], [0.0, 1.0])


# ---- round trips --------------------------------------------------------------------------
_values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False).map(Fraction),
    st.builds(lambda n, k: Fraction(n, 10**k), st.integers(-10**12, 10**12), st.integers(0, 12)),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(Fraction),
)


@st.composite
def _properties(draw) -> Property:
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cases, seen = [], set()
    for _ in range(draw(st.integers(1, 2))):
        pairs = [sorted(draw(st.lists(_values, min_size=2, max_size=2))) for _ in range(n_in)]
        lo, hi = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        if (lo, hi) in seen:
            continue
        seen.add((lo, hi))
        open_lo = frozenset(i for i in range(n_in) if lo[i] < hi[i] and draw(st.booleans()))
        disjuncts = []
        for _ in range(draw(st.integers(1, 2))):
            rows = []
            for _ in range(draw(st.integers(1, 2))):
                idx = sorted(draw(st.sets(st.integers(0, n_out - 1), min_size=1)))
                coefs = [draw(_values.filter(lambda v: v != 0)) for _ in idx]
                rows.append(Row(tuple(zip(idx, coefs, strict=True)), draw(_values),
                                draw(st.booleans())))
            disjuncts.append(tuple(rows))
        cases.append(Case(Box(lo, hi, open_lo), tuple(disjuncts)))
    return Property(n_in, n_out, tuple(cases))


@settings(FAST, max_examples=40)
@given(_properties())
def test_write_then_read_round_trips_exactly(prop):
    assert parse_vnnlib(format_vnnlib(prop)) == prop


@FAST
@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=20),
       st.floats(0, 0.5), st.integers(0, 9))
def test_robustness_files_round_trip_with_float_exact_tensors(tmp_path_factory, x, eps, label):
    prop = linf_robustness(x, eps, label, 10)
    path = tmp_path_factory.mktemp("rt") / "p.vnnlib"
    write_vnnlib(path, prop)
    back = read_vnnlib(path)
    assert back == prop
    lo, hi = back.box_tensors()
    for v, a, b in zip(x, lo.tolist(), hi.tolist(), strict=True):
        assert Fraction(a) <= max(Fraction(v) - Fraction(eps), 0)
        assert Fraction(b) >= min(Fraction(v) + Fraction(eps), 1)


def test_decimal_text_is_exact_or_refused():
    for q in (Fraction(0), Fraction(-5, 2), Fraction(5e-324), Fraction(1.7e308), Fraction(0.1)):
        assert Fraction(decimal_text(q)) == q and "." in decimal_text(q)
    with pytest.raises(PropertyError, match="no finite decimal"):
        decimal_text(Fraction(1, 3))


# ---- bad input ----------------------------------------------------------------------------
GOOD = HEAD + BOX + "(assert (or (and (>= Y_0 Y_1))))\n"
DECLS = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
BOX1 = "(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
OUT1 = "(assert (>= Y_0 0))\n"
# each text marks the expected error position with "@"
BAD = {
    "unbalanced open": (DECLS + BOX1 + "@(assert (>= Y_0 0)\n", "never closed"),
    "unbalanced close": (DECLS + BOX1 + OUT1 + "@)", "closes no"),
    "unknown command": (DECLS + "(@define-fun f () Real 0)\n" + BOX1 + OUT1, "unknown command"),
    "unknown operator": (DECLS + BOX1 + "(assert (@distinct Y_0 0))", "unknown operator"),
    "not operator": (DECLS + BOX1 + "(assert (@not (>= Y_0 0)))", "unknown operator"),
    "undeclared variable": (DECLS + BOX1 + "(assert (>= @Y_1 0))", "undeclared variable Y_1"),
    "use before declare": ("(declare-const X_0 Real)\n" + BOX1 + "(assert (>= @Y_0 0))\n"
                           "(declare-const Y_0 Real)", "undeclared"),
    "declared twice": (DECLS + "(declare-const @X_0 Real)\n" + BOX1 + OUT1, "declared twice"),
    "bad name": ("(declare-const @Z_0 Real)\n" + DECLS + BOX1 + OUT1, "not named X_i"),
    "leading zero": ("(declare-const @X_01 Real)\n" + DECLS + BOX1 + OUT1, "not named X_i"),
    "lowercase": ("(declare-const @x_0 Real)\n" + DECLS + BOX1 + OUT1, "not named X_i"),
    "not Real": ("(declare-const X_0 @Int)\n(declare-const Y_0 Real)\n" + BOX1 + OUT1, "Real"),
    "gap": (DECLS + "(declare-const @X_2 Real)\n" + BOX1 + OUT1, "X_1 is not"),
    "no outputs": ("(declare-const X_0 Real)\n" + BOX1 + "@", "no output variable"),
    "empty file": ("@", "no input variable"),
    "non-number": (DECLS + BOX1 + "(assert (>= Y_0 @1.2.3))", "not a number"),
    "unknown symbol": (DECLS + BOX1 + "(assert (>= Y_0 @true))", "unknown symbol"),
    "nan": (DECLS + BOX1 + "(assert (>= Y_0 @nan))", "NaN"),
    "inf": (DECLS + BOX1 + "(assert (<= Y_0 @+inf))", "infinite"),
    "huge": (DECLS + BOX1 + "(assert (<= Y_0 @1e400))", "float64 range"),
    "nonlinear": ("(declare-const X_1 Real)\n" + DECLS.replace("X_0 Real)", "X_0 Real)") + BOX1
                  + "(assert (<= X_1 1))(assert (>= X_1 0))(assert (<= (* X_0 @X_1) 0))" + OUT1,
                  "nonlinear"),
    "nonlinear outputs": ("(declare-const Y_1 Real)\n" + DECLS + BOX1
                          + "(assert (<= (* Y_0 @Y_1) 0))", "nonlinear"),
    "coupled inputs": ("(declare-const X_1 Real)\n" + DECLS + BOX1
                       + "(assert (<= X_1 1))(assert @(<= (+ X_0 X_1) 1))" + OUT1,
                       "coupling inputs"),
    "inputs and outputs": (DECLS + BOX1 + "(assert @(<= X_0 Y_0))", "coupling inputs and outp"),
    "no lower bound": ("(declare-const @X_0 Real)\n(declare-const Y_0 Real)\n"
                       "(assert (<= X_0 1))\n" + OUT1, "no lower bound"),
    "no upper bound": ("(declare-const @X_0 Real)\n(declare-const Y_0 Real)\n"
                       "(assert (>= X_0 1))\n" + OUT1, "no upper bound"),
    "empty box": (DECLS + "(assert (<= X_0 0))\n(assert @(>= X_0 0.5))\n" + OUT1, "empty box"),
    "empty strict box": (DECLS + "(assert (< X_0 0.5))\n(assert @(>= X_0 0.5))\n" + OUT1,
                         "empty box"),
    "no output constraint": (DECLS + BOX1 + "@", "no output constraint"),
    "constant constraint": (DECLS + BOX1 + OUT1 + "(assert @(<= 1 2))", "without variables"),
    "empty and": (DECLS + BOX1 + "(assert @(and))", "at least one"),
    "three arguments": (DECLS + BOX1 + "(assert @(<= Y_0 1 2))", "takes 2 arguments"),
    "atom formula": (DECLS + BOX1 + "(assert @Y_0)", "expected a constraint"),
    "term formula": (DECLS + BOX1 + "(assert @(+ Y_0 1))", "expected a constraint"),
    "formula as term": (DECLS + BOX1 + "(assert (<= @(and Y_0) 1))", "linear term"),
    "top-level atom": (DECLS + "@assert", "expected a command"),
    "empty list": (DECLS + BOX1 + "(assert (<= Y_0 @()))", "empty list"),
    "quoted symbol": (DECLS + BOX1 + "(assert (<= Y_0 @|x|))", "unexpected character"),
    "too many variables": ("(declare-const @X_99999999 Real)\n" + DECLS, "too many variables"),
    "long token": (DECLS + BOX1 + "(assert (<= Y_0 @" + "1" * 5000 + "))", "characters"),
    "deep nesting": (DECLS + BOX1 + "(assert " + "(and " * 199 + "@(and " * 9801
                     + ")" * 10001, "nested deeper"),
}


def _marked(text: str) -> tuple[str, str]:
    at = text.index("@")
    text = text[:at] + text[at + 1:]
    line = text.count("\n", 0, at) + 1
    return text, f"<text>:{line}:{at - text.rfind(chr(10), 0, at)}: "


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_property_error_with_its_position(case):
    text, message = BAD[case]
    text, where = _marked(text)
    with pytest.raises(PropertyError) as info:
        parse_vnnlib(text)
    assert str(info.value).startswith(where), str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("data", "where", "message"), [
    (GOOD.encode() + b"(assert \x00)", "<bytes>:10:9: ", "binary"),
    (GOOD.encode() + b"; caf\xe9\n", "<bytes>:10:6: ", "not UTF-8"),
])
def test_binary_and_non_utf8_bytes_are_refused(data, where, message):
    with pytest.raises(PropertyError, match=re.escape(where) + message):
        read_vnnlib(data)


def test_files_too_large_or_missing_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "p.vnnlib"
    path.write_text(GOOD)
    assert read_vnnlib(path).n_inputs == 2 and read_vnnlib(str(path)).n_outputs == 2
    with pytest.raises(PropertyError, match="cannot read"):
        read_vnnlib(tmp_path / "missing.vnnlib")
    with pytest.raises(PropertyError, match="cannot read"):
        read_vnnlib(tmp_path)
    monkeypatch.setattr(vnnlib_module, "MAX_BYTES", 100)
    with pytest.raises(PropertyError, match="over the limit"):
        read_vnnlib(path)


def test_nesting_within_the_limit_reads():
    term = "(+ " * 190 + "Y_0" + ")" * 190
    prop = parse_vnnlib(GOOD + f"(assert (<= {term} 1))")
    assert len(prop.cases[0].violation[0]) == 2


# ---- fuzz ---------------------------------------------------------------------------------
_TOKENS = ["(", ")", "and", "or", "<=", ">=", "<", "=", "X_0", "Y_9", "X_785", "Y_10", "-",
           "*", "+", "nan", "1e999", "-0.5", "declare-const", "assert", "Real", ";", "0", "\x00",
           "é", "|", "\n"]


@st.composite
def _mutants(draw, text: str) -> str:
    tokens = re.findall(r"\s+|[()]|[^\s()]+", text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(tokens) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "replace", "char", "cut"]))
        if op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "replace":
            tokens[i] = draw(st.sampled_from(_TOKENS))
        elif op == "char" and tokens[i]:
            j = draw(st.integers(0, len(tokens[i]) - 1))
            tokens[i] = tokens[i][:j] + draw(st.sampled_from("()_;-+.eE0159XY \n")) \
                + tokens[i][j + 1:]
        else:
            tokens = tokens[:i]
        if not tokens:
            tokens = [""]
    return "".join(tokens)


def _parses_or_refuses(text: str) -> None:
    try:
        prop = read_vnnlib(text.encode("utf-8", "surrogatepass"))
    except PropertyError:
        return
    assert isinstance(prop, Property)
    prop.box_tensors()


_SMALL = HEAD + BOX + "(assert (or (and (>= Y_0 Y_1)) (and (<= (+ Y_0 (* -2 Y_1)) 0.5))))\n"


@settings(max_examples=300, deadline=None)
@given(_mutants(_SMALL))
def test_fuzz_small_file(text):
    _parses_or_refuses(text)


@needs_shared
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_real_file(data):
    _parses_or_refuses(data.draw(_mutants(MNIST_FC[0].read_text())))


# ---- result and instance files ------------------------------------------------------------
_finite = st.floats(allow_nan=False, allow_infinity=False)


@FAST
@given(st.lists(_finite, min_size=1, max_size=12), st.lists(_finite, min_size=1, max_size=12))
def test_sat_witness_round_trips_exactly(tmp_path_factory, x, y):
    path = tmp_path_factory.mktemp("res") / "result.txt"
    write_result(path, "sat", x, y)
    back = read_result(path)
    assert back.status == "sat"
    assert [v.hex() for v in back.x] == [float(v).hex() for v in x]
    assert [v.hex() for v in back.y] == [float(v).hex() for v in y]


def test_result_statuses_and_the_witness_format(tmp_path):
    for status in ("unsat", "unknown", "timeout", "error"):
        write_result(tmp_path / "r", status)
        assert (tmp_path / "r").read_text() == f"{status}\n"
        assert read_result(tmp_path / "r").status == status
    assert format_result("sat", [0.5, -1e-05], torch.tensor([2.0])) == \
        "sat\n((X_0 0.5)\n (X_1 -1e-05)\n (Y_0 2.0))\n"
    with pytest.raises(InputError):
        write_result(tmp_path / "r", "holds")
    with pytest.raises(InputError):
        write_result(tmp_path / "r", "sat")


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "r"
    write_result(path, "unknown")
    with pytest.raises(InputError):
        write_result(path, "sat", [math.nan], [0.0])

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_result(path, "sat", [1.0], [2.0])
    assert path.read_text() == "unknown\n" and os.listdir(tmp_path) == ["r"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected a status"), ("holds\n", "expected a status"), ("unsat\n(X_0 1)", "after"),
    ("sat\n((X_0 1) (Y_0 nan))", "not a finite"), ("sat\n((X_0 1) (X_0 2) (Y_0 1))", "twice"),
    ("sat\n((X_1 1) (Y_0 1))", "X_0 .. X_n-1"), ("sat\n((X_0 1) (Y_0 1)", "never closed"),
    ("sat\n((Z_0 1))", "not X_i"), ("sat\n((X_0 1 2))", "pair"), ("sat\n", "one witness"),
])
def test_malformed_result_files(tmp_path, text, message):
    (tmp_path / "r").write_text(text)
    with pytest.raises(PropertyError, match=message):
        read_result(tmp_path / "r")


@pytest.mark.parametrize(("text", "message"), [
    ("a.onnx,b.vnnlib\n", ":1:1: expected 3 fields"), ("a,b,c,d\n", "3 fields"),
    ("\na.onnx,b.vnnlib,ten\n", ":2:1: timeout 'ten'"), ("a.onnx,b.vnnlib,-1\n", "positive"),
    ("a.onnx,,10\n", "empty path"), ("\n\n", "no instances"), ("a,b,nan\n", "positive"),
])
def test_malformed_instances(tmp_path, text, message):
    (tmp_path / "instances.csv").write_text(text)
    with pytest.raises(PropertyError, match=message):
        read_instances(tmp_path / "instances.csv")


def test_instances_resolve_against_the_csv_folder(tmp_path):
    (tmp_path / "instances.csv").write_text("onnx/n.onnx, vnnlib/p.vnnlib ,60\n\n")
    (inst,) = read_instances(tmp_path / "instances.csv")
    assert inst.onnx == tmp_path / "onnx" / "n.onnx"
    assert inst.vnnlib == tmp_path / "vnnlib" / "p.vnnlib" and inst.timeout_s == 60.0

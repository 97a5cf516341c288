"""Read and write VNN-LIB 1.0 properties (www.vnnlib.org; the format of the VNN-COMP rules).

certnet's own reader, not the PyPI ``vnnlib`` package: its 1.0.x releases parse the newer
VNN-LIB *2.0* syntax only and reject every 1.0 file (``declare-const``; all VNN-COMP files),
turn decimals into floats (inexact) and are a compiled extension; this reader keeps every
decimal exact, names ``file:line:column`` in every error and needs nothing but the standard
library (a 784-input VNN-COMP file reads in ~25 ms).

The subset read (SMT-LIB syntax, nothing evaluated or executed): ``;`` comments;
``(declare-const X_i Real)`` / ``(declare-const Y_i Real)`` with indices 0..n-1 and declared
before use; ``(assert F)`` where ``F`` nests ``and`` / ``or`` over comparisons ``<=`` ``>=``
``<`` ``>`` ``=`` of linear terms built from ``+``, ``-`` (unary and binary), ``*`` by
constants, variables and decimals (``0.5``, ``-0.5``, ``(- 0.5)``, ``1e-5``). ``=`` is the two
inequalities; strict ``<`` / ``>`` are kept exact (see :mod:`.property`). ``(check-sat)``,
``(get-model)`` and ``(exit)`` are accepted and ignored. Each comparison must bound one input
(making a box) or constrain outputs only; anything else is refused with its position, as are an
input without both bounds, an empty box (it would make every property hold vacuously), no output
constraint, NaN / infinite literals, nonlinear terms, binary or non-UTF-8 content, files over
:data:`MAX_BYTES` and more than :data:`MAX_VARIABLES` variables.

The writer states every number as its exact finite decimal (a float64 such as 0.1 is written
with all of its ~55 digits), so a written property reads back equal, and its float64 tensors
equal the original floats: ``repr`` would read back as a different rational, and outward
rounding would then move a lower bound one ulp.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

from certnet.errors import PropertyError
from certnet.files import atomic_write

from .exact import FLOAT_MAX, decimal_text
from .property import Box, Case, Property, Row
from .sexpr import Node, Source, decode, read_sexprs

#: largest file read
MAX_BYTES = 200 * 2**20
#: most inputs + outputs (224 x 224 x 3 ImageNet inputs are 150,528)
MAX_VARIABLES = 2**22
#: most conjunctions after distributing ``and`` over ``or``
MAX_CONJUNCTIONS = 1_000_000

_NAME = re.compile(r"([XY])_(0|[1-9][0-9]*)\Z")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,5})?\Z")
_NONFINITE = re.compile(r"[-+]?(nan|inf|infinity)\Z", re.I)
_INT_MAX = 2**53  # integers up to this are within the float64 range: a fast path
_COMPARE = {"<=", ">=", "<", ">", "="}
_ARITH = {"+", "-", "*"}
_IGNORED = {"check-sat", "get-model", "exit"}

# an atom after normalisation: (0, i, upper, value, strict, pos) bounds X_i; (1, Row, pos)
Atom = tuple


def read_vnnlib(source: str | os.PathLike | bytes) -> Property:
    """A VNN-LIB file: a path (``PathLike``, or a ``str`` without ``(``), VNN-LIB text (a
    ``str`` with ``(``) or the bytes of a file. Any fault is one :class:`PropertyError`."""
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    elif isinstance(source, str) and "(" in source:
        if len(source) > MAX_BYTES:
            raise PropertyError(f"<text>: {len(source)} characters, over {MAX_BYTES}")
        return parse_vnnlib(source)
    else:
        name = os.fspath(source)
        try:
            size = os.stat(name).st_size
            if size > MAX_BYTES:
                raise PropertyError(f"{name}: {size} bytes, over the limit of {MAX_BYTES}")
            data = Path(name).read_bytes()
        except OSError as e:
            raise PropertyError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise PropertyError(f"{name}: {len(data)} bytes, over the limit of {MAX_BYTES}")
    return _Reader(decode(data, name)).run()


def parse_vnnlib(text: str, name: str = "<text>") -> Property:
    """VNN-LIB text (see :func:`read_vnnlib`)."""
    return _Reader(decode(text.encode("utf-8", "surrogatepass"), name)).run()


class _Reader:
    def __init__(self, src: Source) -> None:
        self.src = src
        self.decls: dict[str, tuple[bool, int]] = {}
        self.declared_at: dict[tuple[bool, int], int] = {}
        self.numbers: dict[str, Fraction] = {}

    def err(self, pos: int, message: str) -> PropertyError:
        return self.src.error(pos, message)

    # ---- commands -------------------------------------------------------------------
    def run(self) -> Property:
        base: list[Atom] = []
        split: list[list[list[Atom]]] = []
        for node in read_sexprs(self.src):
            if not isinstance(node, list):
                raise self.err(node[0], f"expected a command '(...)', got {node[1]!r}")
            if len(node) == 1 or isinstance(node[1], list):
                raise self.err(node[0], "expected a command name after '('")
            cmd = node[1][1]
            if cmd == "declare-const":
                self.declare(node)
            elif cmd == "assert":
                if len(node) != 3:
                    raise self.err(node[0], f"assert takes 1 formula, got {len(node) - 2}")
                dnf = self.formula(node[2])
                if len(dnf) == 1:
                    base.extend(dnf[0])
                else:
                    split.append(dnf)
            elif cmd in _IGNORED and len(node) == 2:
                continue
            else:
                raise self.err(node[1][0], f"unknown command {cmd!r} (VNN-LIB 1.0 uses "
                               "declare-const and assert)")
        n_in, n_out = self.count(False), self.count(True)
        conjunctions: list[list[Atom]] = [[]]
        for dnf in split:
            conjunctions = self.product(conjunctions, dnf, dnf[0][0][-1] if dnf[0] else 0)
        return self.build(n_in, n_out, base, conjunctions)

    def declare(self, node: list) -> None:
        if len(node) != 4 or isinstance(node[2], list) or isinstance(node[3], list):
            raise self.err(node[0], "expected (declare-const NAME Real)")
        pos, name = node[2]
        if node[3][1] != "Real":
            raise self.err(node[3][0], f"{name} has sort {node[3][1]!r}; VNN-LIB variables "
                           "are Real")
        m = _NAME.match(name)
        if not m:
            raise self.err(pos, f"variable {name!r} is not named X_i (input) or Y_i (output)")
        if name in self.decls:
            raise self.err(pos, f"{name} is declared twice (first at "
                           f"{self.src.where(self.declared_at[self.decls[name]])})")
        if len(m.group(2)) > 9 or int(m.group(2)) >= MAX_VARIABLES \
                or len(self.decls) >= MAX_VARIABLES:
            raise self.err(pos, f"too many variables (at most {MAX_VARIABLES})")
        key = (m.group(1) == "Y", int(m.group(2)))
        self.decls[name] = key
        self.declared_at[key] = pos

    def count(self, output: bool) -> int:
        letter = "Y" if output else "X"
        idx = sorted(i for (out, i) in self.declared_at if out == output)
        if not idx:
            raise self.err(len(self.src.text), f"no {'output' if output else 'input'} "
                           f"variable declared ({letter}_0, ...)")
        for expect, i in enumerate(idx):
            if i != expect:
                raise self.err(self.declared_at[(output, i)], f"{letter}_{i} is declared but "
                               f"{letter}_{expect} is not: indices must be 0..n-1 without gaps")
        return len(idx)

    # ---- formulas: DNF as a list of conjunctions (lists of atoms) ---------------------
    def product(self, a: list[list[Atom]], b: list[list[Atom]], pos: int) -> list[list[Atom]]:
        if len(a) * len(b) > MAX_CONJUNCTIONS:
            raise self.err(pos, f"more than {MAX_CONJUNCTIONS} cases after distributing "
                           "'and' over 'or'")
        return [x + y for x in a for y in b]

    def formula(self, node: Node) -> list[list[Atom]]:
        if not isinstance(node, list):
            raise self.err(node[0], f"expected a constraint (and, or, <=, >=, <, >, =), got "
                           f"{node[1]!r}")
        op, args = self.head(node)
        if op in ("and", "or"):
            if not args:
                raise self.err(node[0], f"'{op}' needs at least one argument")
            parts = [self.formula(a) for a in args]
            if op == "or":
                out = [c for p in parts for c in p]
                if len(out) > MAX_CONJUNCTIONS:
                    raise self.err(node[0], f"more than {MAX_CONJUNCTIONS} disjuncts")
                return out
            single = [atom for p in parts if len(p) == 1 for atom in p[0]]
            out = [single]
            for p in parts:
                if len(p) != 1:
                    out = self.product(out, p, node[0])
            return out
        if op in _COMPARE:
            if len(args) != 2:
                raise self.err(node[0], f"'{op}' takes 2 arguments, got {len(args)}")
            fast = self.simple(op, args, node[0])
            if fast is not None:
                return fast
            (lc, lk), (rc, rk) = self.term(args[0]), self.term(args[1])
            coefs = dict(lc)
            for v, c in rc.items():
                coefs[v] = coefs.get(v, 0) - c
            const = lk - rk if rk else lk  # lhs - rhs = sum(coefs) + const
            if op in ("<=", "<"):
                return [[self.atom(coefs, -const, op == "<", node[0])]]
            neg = {v: -c for v, c in coefs.items()}
            if op in (">=", ">"):
                return [[self.atom(neg, const, op == ">", node[0])]]
            return [[self.atom(coefs, -const, False, node[0]),
                     self.atom(neg, const, False, node[0])]]
        if op in _ARITH:
            raise self.err(node[0], f"expected a constraint, got the term '{op}'")
        raise self.err(node[1][0], f"unknown operator {op!r}")

    def simple(self, op: str, args: list, pos: int) -> list[list[Atom]] | None:
        """The common comparisons, fast: ``(<= X_i c)``, ``(>= c X_i)``, ``(>= Y_j Y_l)``."""
        (lp, lt), (rp, rt) = (args[0], args[1]) if not (
            isinstance(args[0], list) or isinstance(args[1], list)) else ((0, ""), (0, ""))
        lv, rv = self.decls.get(lt), self.decls.get(rt)
        upper = op in ("<=", "<")  # lhs <= rhs
        strict = op in ("<", ">")
        if lv is not None and rv is None and not lv[0] and lt != "" and op != "=":
            value = Fraction(self.number(rp, rt))
            return [[(0, lv[1], upper, value, strict, pos)]]
        if rv is not None and lv is None and not rv[0] and rt != "" and op != "=":
            value = Fraction(self.number(lp, lt))
            return [[(0, rv[1], not upper, value, strict, pos)]]
        if lv is not None and rv is not None and lv[0] and rv[0] and lt != rt and op != "=":
            a, b = (lv[1], rv[1]) if upper else (rv[1], lv[1])  # Y_a - Y_b <= 0
            terms = ((a, Fraction(1)), (b, Fraction(-1))) if a < b else \
                ((b, Fraction(-1)), (a, Fraction(1)))
            return [[(1, Row(terms, Fraction(0), strict, self.src.where(pos)), pos)]]
        return None

    def head(self, node: list) -> tuple[str, list]:
        if len(node) == 1:
            raise self.err(node[0], "empty list '()'")
        if isinstance(node[1], list):
            raise self.err(node[1][0], "expected an operator after '('")
        return node[1][1], node[2:]

    def term(self, node: Node) -> tuple[dict[str, Fraction], Fraction]:
        """A linear term: (coefficient of each variable, constant)."""
        if not isinstance(node, list):
            pos, text = node
            if text in self.decls:
                return {text: 1}, 0
            return {}, self.number(pos, text)
        op, args = self.head(node)
        if op not in _ARITH:
            if op in _COMPARE or op in ("and", "or"):
                raise self.err(node[0], f"expected a number or linear term, got '{op}'")
            raise self.err(node[1][0], f"unknown operator {op!r}")
        if not args:
            raise self.err(node[0], f"'{op}' needs at least one argument")
        terms = [self.term(a) for a in args]
        if op == "*":
            var, factor = None, 1
            for arg, (c, k) in zip(args, terms, strict=True):
                if not c:
                    factor = k if factor == 1 else factor * k
                elif var is not None:
                    raise self.err(arg[0], "nonlinear term: '*' of two variable terms (only "
                                   "multiplication by constants is linear)")
                else:
                    var = (c, k)
            if var is None:
                return {}, factor
            if factor == 1:
                return var
            return {v: x * factor for v, x in var[0].items()}, var[1] * factor
        if op == "-" and len(terms) == 1:
            c, k = terms[0]
            return {v: -x for v, x in c.items()}, -k
        coefs, const = dict(terms[0][0]), terms[0][1]
        minus = op == "-"
        for c, k in terms[1:]:
            for v, x in c.items():
                coefs[v] = coefs.get(v, 0) - x if minus else coefs.get(v, 0) + x
            if k:
                const = const - k if minus else const + k
        return coefs, const

    def number(self, pos: int, text: str) -> Fraction | int:
        value = self.numbers.get(text)
        if value is not None:
            return value
        if _NAME.match(text):
            raise self.err(pos, f"undeclared variable {text} (declare it first with "
                           f"(declare-const {text} Real))")
        if _NONFINITE.match(text):
            raise self.err(pos, f"{text!r}: NaN and infinite values are not numbers here")
        if not _NUMBER.match(text):
            if text[:1].isdigit() or text[:1] in "+-.":
                raise self.err(pos, f"{text!r} is not a number")
            raise self.err(pos, f"unknown symbol {text!r} (variables are X_i / Y_i, declared "
                           "with declare-const)")
        value = Fraction(text)
        if abs(value) > FLOAT_MAX:
            raise self.err(pos, f"{text} is outside the float64 range")
        if value.denominator == 1:  # int arithmetic is much faster, and as exact
            value = value.numerator
        self.numbers[text] = value
        return value

    def atom(self, coefs: dict[str, Fraction], rhs: Fraction, strict: bool, pos: int) -> Atom:
        """``sum(coefs) <= rhs`` (``<``): a bound on one input or a row over outputs."""
        xs, ys = [], []
        for v, c in coefs.items():
            if c != 0:
                out, i = self.decls[v]
                (ys if out else xs).append((i, c if type(c) is Fraction else Fraction(c)))
        if not xs and not ys:
            raise self.err(pos, "a constraint without variables")
        if xs and ys:
            raise self.err(pos, f"a constraint coupling inputs and outputs (X_{xs[0][0]}, "
                           f"Y_{ys[0][0]}) is not supported")
        if len(xs) > 1:
            raise self.err(pos, f"a constraint coupling inputs X_{xs[0][0]} and X_{xs[1][0]}: "
                           "only bounds on single inputs (a box) are supported")
        if ys:
            ys.sort()
            rhs = rhs if type(rhs) is Fraction else Fraction(rhs)
            return (1, Row(tuple(ys), rhs, strict, self.src.where(pos)), pos)
        i, a = xs[0]
        return (0, i, a > 0, Fraction(rhs) / a, strict, pos)

    # ---- boxes and cases --------------------------------------------------------------
    def build(self, n_in: int, n_out: int, base: list[Atom],
              conjunctions: list[list[Atom]]) -> Property:
        base_bounds = self.bounds(n_in, [a for a in base if a[0] == 0])
        base_rows = [a[1] for a in base if a[0] == 1]
        base: list | None = None  # [box, disjuncts] of the shared box, never hashed
        cases: list[list] = []
        by_value: dict[Box, list] = {}  # other boxes: equal ones merge
        for conj in conjunctions:
            extra = [a for a in conj if a[0] == 0]
            if extra:
                box = self.box(self.bounds(n_in, extra, base_bounds))
                if not by_value and base is not None:
                    by_value[base[0]] = base
                entry = by_value.get(box)
                if entry is None:
                    entry = by_value[box] = [box, []]
                    cases.append(entry)
            else:
                if base is None:
                    box = self.box(base_bounds)
                    base = by_value.get(box) if by_value else None
                    if base is None:
                        base = [box, []]
                        cases.append(base)
                        if by_value:
                            by_value[box] = base
                entry = base
            rows = base_rows + [a[1] for a in conj if a[0] == 1]
            if not rows:
                raise self.err(conj[0][-1] if conj else len(self.src.text),
                               "no output constraint: VNN-LIB asserts the violation, and one "
                               "without a Y constraint would be violated by any input")
            entry[1].append(tuple(rows))
        return Property(n_in, n_out, tuple(Case(b, tuple(v)) for b, v in cases))

    def bounds(self, n: int, atoms: Iterable[Atom], start: list | None = None) -> list:
        """Per input [lo, lo_strict, lo_pos, hi, hi_strict, hi_pos], tightest wins."""
        b = [list(e) for e in start] if start else [[None, False, -1, None, False, -1]
                                                    for _ in range(n)]
        for _, i, upper, value, strict, pos in atoms:
            e = b[i]
            if upper:
                if e[3] is None or value < e[3] or (value == e[3] and strict):
                    e[3:6] = value, strict, pos
            elif e[0] is None or value > e[0] or (value == e[0] and strict):
                e[0:3] = value, strict, pos
        return b

    def box(self, bounds: list) -> Box:
        for i, (lo, los, lop, hi, his, hip) in enumerate(bounds):
            for value, side in ((lo, "lower"), (hi, "upper")):
                if value is None:
                    raise self.err(self.declared_at[(False, i)], f"X_{i} has no {side} bound: "
                                   "every input needs both (the input region is a box)")
            for value, p in ((lo, lop), (hi, hip)):
                if value.denominator != 1 or abs(value.numerator) > _INT_MAX:
                    if abs(value) > FLOAT_MAX:
                        raise self.err(p, f"the bound {float(value):g} of X_{i} is outside "
                                       "the float64 range")
            if lo > hi or (lo == hi and (los or his)):
                raise self.err(max(lop, hip), f"empty box: X_{i} between {decimal_text(lo)} "
                               f"and {decimal_text(hi)}; it would make the property hold "
                               "vacuously, so certnet refuses it")
        return Box(tuple(e[0] for e in bounds), tuple(e[3] for e in bounds),
                   frozenset(i for i, e in enumerate(bounds) if e[1]),
                   frozenset(i for i, e in enumerate(bounds) if e[4]))


# ---- writing --------------------------------------------------------------------------
def format_vnnlib(prop: Property, comment: str = "") -> str:
    """The VNN-LIB text of ``prop``; every number exact (see the module docstring)."""
    out = [f"; {line}".rstrip() for line in comment.splitlines()]
    out += [f"(declare-const X_{i} Real)" for i in range(prop.n_inputs)]
    out += [f"(declare-const Y_{j} Real)" for j in range(prop.n_outputs)]
    if len(prop.cases) == 1:
        case = prop.cases[0]
        out += [f"(assert {b})" for b in _bounds_text(case.box)]
        out.append(f"(assert {_violation_text(case)})")
    else:
        out.append("(assert (or")
        for case in prop.cases:
            out.append(f"  (and {' '.join(_bounds_text(case.box))}")
            out.append(f"    {_violation_text(case)})")
        out.append("))")
    return "\n".join(out) + "\n"


def write_vnnlib(path: str | os.PathLike, prop: Property, comment: str = "") -> None:
    """Write ``prop`` to ``path`` atomically (it reads back equal with :func:`read_vnnlib`)."""
    atomic_write(path, format_vnnlib(prop, comment))


def _bounds_text(box: Box) -> list[str]:
    out = []
    for i, (lo, hi) in enumerate(zip(box.lo, box.hi, strict=True)):
        out.append(f"({'<' if i in box.open_hi else '<='} X_{i} {decimal_text(hi)})")
        out.append(f"({'>' if i in box.open_lo else '>='} X_{i} {decimal_text(lo)})")
    return out


def _violation_text(case: Case) -> str:
    rows = "\n".join(f"    (and {' '.join(_row_text(r) for r in conj)})"
                     for conj in case.violation)
    return f"(or\n{rows}\n)"


def _row_text(row: Row) -> str:
    coefs = dict(row.terms)
    if row.rhs == 0 and len(coefs) == 2 and sorted(coefs.values()) == [-1, 1]:
        (a,) = (j for j, c in coefs.items() if c == 1)
        (b,) = (j for j, c in coefs.items() if c == -1)
        return f"({'>' if row.strict else '>='} Y_{b} Y_{a})"  # Y_a - Y_b <= 0
    terms = [f"Y_{j}" if c == 1 else f"(* {decimal_text(c)} Y_{j})" for j, c in row.terms]
    lhs = terms[0] if len(terms) == 1 else f"(+ {' '.join(terms)})"
    return f"({'<' if row.strict else '<='} {lhs} {decimal_text(row.rhs)})"

"""S-expressions of the SMT-LIB subset VNN-LIB 1.0 uses, read without recursion or evaluation.

A list node is a Python ``list`` ``[offset, child, ...]``; an atom is a tuple
``(offset, text)``; ``offset`` indexes the source text, :meth:`Source.where` turns it into
``file:line:column``. Nesting deeper than :data:`MAX_DEPTH` is refused while reading, so code
walking the tree may recurse safely.
"""

from __future__ import annotations

import bisect
import re

from certnet.errors import PropertyError

#: deepest list nesting read; VNN-COMP files nest 4 to 6 deep
MAX_DEPTH = 200
#: longest single token (the exact decimal of the smallest float64 has ~1,100 characters)
MAX_TOKEN = 4096

Atom = tuple[int, str]
Node = list | Atom

_TOKEN = re.compile(r"""[^\s();"|]+|[()]|;[^\n]*|[^\s]""")


class Source:
    """Text with a name, for ``name:line:column`` positions."""

    def __init__(self, text: str, name: str) -> None:
        self.text, self.name = text, name
        self._starts: list[int] | None = None

    def where(self, offset: int) -> str:
        if self._starts is None:
            self._starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        line = bisect.bisect_right(self._starts, offset)
        return f"{self.name}:{line}:{offset - self._starts[line - 1] + 1}"

    def error(self, offset: int, message: str) -> PropertyError:
        return PropertyError(f"{self.where(offset)}: {message}")


def decode(data: bytes, name: str) -> Source:
    """UTF-8 text of a file; binary (NUL bytes) or non-UTF-8 content is a PropertyError."""
    nul = data.find(b"\x00")
    if nul >= 0:
        good = data[:nul].decode("utf-8", "replace")
        raise Source(good, name).error(len(good), "binary content (a NUL byte), not a text "
                                       "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        good = data[: e.start].decode("utf-8", "replace")
        raise Source(good, name).error(len(good), "not UTF-8 text") from None
    return Source(text.replace("\ufeff", " ", 1) if text.startswith("\ufeff") else text, name)


def read_sexprs(src: Source) -> list[Node]:
    """The top-level nodes of ``src``; ``;`` starts a comment up to the end of the line."""
    top: list[Node] = []
    stack: list[list] = []
    current: list = top
    for m in _TOKEN.finditer(src.text):
        tok = m.group()
        c = tok[0]
        if c == "(":
            if len(stack) >= MAX_DEPTH:
                raise src.error(m.start(), f"lists nested deeper than {MAX_DEPTH}")
            node = [m.start()]
            current.append(node)
            stack.append(current)
            current = node
        elif c == ")":
            if not stack:
                raise src.error(m.start(), "unbalanced ')' closes no '('")
            current = stack.pop()
        elif c == ";":
            continue
        elif c in '"|':
            raise src.error(m.start(), f"unexpected character {c!r}")
        else:
            if len(tok) > MAX_TOKEN:
                raise src.error(m.start(), f"a token of {len(tok)} characters (at most "
                                f"{MAX_TOKEN})")
            current.append((m.start(), tok))
    if stack:
        raise src.error(current[0], "unbalanced '(' is never closed")
    return top

"""Lines of docstrings and comments per line of code, per package of ``distnorm``.

A maintenance measure (how heavy the code is to read), not a benchmark: docstrings of
modules, classes and functions plus comment-only lines, against lines holding code.
Usage: ``python tools/doc_ratio.py [REPOSITORY]`` (default: this repository).
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_LAYOUT = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def count(path: Path) -> tuple[int, int]:
    """(docstring and comment-only lines, code lines) of one file."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, _DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            first = node.body[0]
            docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    comments: set[int] = set()
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments.add(token.start[0])
        elif token.type not in _LAYOUT:
            code.update(range(token.start[0], token.end[0] + 1))
    code -= docstrings
    return len(docstrings | (comments - code)), len(code)


def main(root: Path) -> None:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in sorted(root.glob("distnorm/**/*.py")):
        documentation, code = count(path)
        for package in (str(path.parent.relative_to(root)), "distnorm (all)"):
            totals[package][0] += documentation
            totals[package][1] += code
    for package, (documentation, code) in sorted(totals.items()):
        ratio = documentation / code
        print(f"{package:16s} {documentation:5d} doc/comment {code:5d} code  {ratio:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)

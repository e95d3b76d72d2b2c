"""Rebuild ``docs/benchmarks.md`` from the benchmarks' own results, so that no figure in it
is typed by hand.

The words are written in ``docs/benchmarks.template.md``; wherever it has a line
``<!-- results:NAME -->``, the built page holds ``benchmarks/results/NAME.md`` (the tables
that benchmark wrote last, headed by its date, machine and command), with its links
rewritten to work from ``docs/``. Every results file must have its marker: a table left out
is refused here rather than silently missing from the page. A marker whose results file
does not exist yet (the GPU benchmark before it has run) says so on the page.

:func:`benchmarks.common.write_results` calls :func:`write` after a benchmark writes into
``benchmarks/results``, so a benchmark run refreshes the page; to rebuild it by hand (after
editing the template, or merging results)::

    python -m benchmarks.docs
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPOSITORY, RESULTS_DIR

TEMPLATE = REPOSITORY / "docs" / "benchmarks.template.md"
PAGE = REPOSITORY / "docs" / "benchmarks.md"

MARKER = re.compile(r"^<!-- results:(?P<name>[\w-]+) -->$", re.MULTILINE)
# A markdown link or image target that is relative to the results folder (not a URL, an
# absolute path or an anchor).
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|/|#)(?P<target>[^)\s]+)\)")


def build(template: Path = TEMPLATE, results: Path = RESULTS_DIR, page: Path = PAGE) -> str:
    """The page: ``template`` with each marker replaced by the results file it names (from
    ``results``), links made relative to ``page``'s folder."""
    text = template.read_text()
    named = set(MARKER.findall(text))
    unplaced = sorted(path.stem for path in results.glob("*.md") if path.stem not in named)
    if unplaced:
        raise ValueError(
            f"{template} has no marker for "
            + ", ".join(f"{results / name}.md" for name in unplaced)
            + "; add a line <!-- results:NAME --> where each belongs"
        )
    prefix = Path(os.path.relpath(results, page.parent)).as_posix()

    def results_of(marker: re.Match) -> str:
        path = results / f"{marker['name']}.md"
        if not path.exists():
            return f"*Not measured yet: there is no `{os.path.relpath(path, REPOSITORY)}`.*"
        return RELATIVE_LINK.sub(
            lambda link: f"]({prefix}/{link['target']})", path.read_text().strip()
        )

    header = (
        f"<!-- Built by `python -m benchmarks.docs` from {os.path.relpath(template, REPOSITORY)} "
        f"and the tables in {os.path.relpath(results, REPOSITORY)}/; edit those, not this file. -->"
    )
    return header + "\n\n" + MARKER.sub(results_of, text).strip() + "\n"


def write() -> Path:
    """Build the page and write it to docs/benchmarks.md."""
    PAGE.write_text(build())
    return PAGE


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    path = write()
    print(f"wrote {path.relative_to(REPOSITORY)}")
    return path


if __name__ == "__main__":
    main()

"""The one writer of BENCHMARKS.md sections, shared by ``python -m kernels.bench`` and
``python -m trainer.bench`` (kernels/ imports nothing of the project, so it lives here).

A section is the text between ``<!-- NAME-bench:start -->`` and ``<!-- NAME-bench:end -->``;
everything outside the markers (headings, notes written by hand) is kept as it is.
"""
from __future__ import annotations

from pathlib import Path


def update_section(path: Path, name: str, heading: str, body: str) -> None:
    """Replace section ``name`` of ``path`` with ``body``; a missing section (or file) is appended
    under ``## heading``."""
    start, end = f"<!-- {name}-bench:start -->", f"<!-- {name}-bench:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{section}\n"
    path.write_text(text)

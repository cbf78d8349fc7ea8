"""Output files: written whole or not at all (a temporary file beside the target, then rename);
tables as Markdown."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that readers never see a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def markdown_table(table) -> str:
    """A pandas DataFrame as a Markdown table, floats to three significant digits."""
    def cell(v):
        return f"{v:,.3g}" if isinstance(v, float) else str(v)
    rows = [[str(c) for c in table.columns]] + [[cell(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(table.columns))
    return "\n".join(lines) + "\n"

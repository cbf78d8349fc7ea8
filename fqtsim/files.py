"""Output files: written whole or not at all (a temporary file beside the target, then rename),
output directories that never take what fqtsim did not write, tables as Markdown.

The rule for output directories (`claim_dir`): a command writes into a directory only if it is
new, empty, or recognisably an earlier output of the same command: every entry is a name that
command writes (`OUTPUTS`) and its signature file is there. It never writes into a directory that
holds one of its own inputs, the current directory or one of its parents. Anything else is
refused with a message naming the path and what is in the way.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

# What each command writes into its output directory: (signature file, entry patterns).
# Temporaries are ".<name>.*.tmp" (write_atomic) and ".<name>.*" folders (replace_dir).
OUTPUTS = {
    "run": ("config.json", ["config.json", "metrics.csv", "ledger.csv", "model.pt", "summary.json",
                            "checkpoint.pt", "ledger-parts"]),
    "report": ("report.md", ["report.html", "report.md", "*.png", "*.csv"]),
    "sweep": ("results.csv", ["results.csv", "table.csv", "table.md", "points"]),
    "variance": ("variance.csv", ["variance.csv", "variance.png", "training"]),
}
TEMPORARY = [".*.tmp", ".*.tmp.*"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Permissions of new files and folders under this process's umask (mkstemp and mkdtemp would
# give 0600 and 0700)
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` so that readers never see a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:   # name the file we were writing, not a temporary or nothing
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):   # a full disk: the write names no file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def check_path(path, option: str = "--out") -> Path:
    """A path argument that is not empty (an empty one would mean the current directory)."""
    if path is None or not str(path).strip():
        raise ValueError(f"{option}: empty path; give a file or directory name")
    return Path(path)


def claim_file(path, inputs=(), option: str = "--csv", suffix: str = ".csv") -> Path:
    """Check that a command may write file `path`: not empty, not a directory, not one of its
    `inputs`, and, if it exists, a `suffix` file (a table it may have written), not anything else."""
    path = check_path(path, option)
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a directory; give a file name")
    if any(path.resolve() == Path(item).resolve() for item in inputs):
        raise ValueError(f"{option}: {path} is an input of this command; give another file name")
    if path.exists() and path.suffix != suffix:
        raise ValueError(f"{option}: {path} exists and is not a {suffix} file; give a new file "
                         f"name ending in {suffix}")
    return path


def foreign_entries(path: Path, command: str) -> list[str]:
    """Entries of directory `path` that `command` does not write (temporaries are its own)."""
    _, patterns = OUTPUTS[command]
    return sorted(p.name for p in path.iterdir()
                  if not any(fnmatch.fnmatch(p.name, g) for g in patterns + TEMPORARY))


def claim_dir(path, command: str, inputs=(), option: str = "--out") -> Path:
    """Check that `command` may write directory `path` (see the module docstring); returns it.

    `inputs`: files and directories the command reads; the output may not contain any of them.
    Returns the path; creates nothing.
    """
    path = check_path(path, option)
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ValueError(f"{option}: {path} is the current directory or one above it; give a new "
                         f"directory for fqtsim {command}'s output")
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise ValueError(f"{option}: {path} contains {item}, an input of this command; give "
                             f"another directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}: {path} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()):
        signature, _ = OUTPUTS[command]
        foreign = foreign_entries(path, command)
        if foreign or not (path / signature).exists():
            what = f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which" \
                if foreign else "has no " + signature + ", so it is not an output of fqtsim " + command + "; it"
            raise ValueError(f"{option}: {path} {what} fqtsim {command} did not write; give a new "
                             f"or empty directory, or remove what is there yourself")
    return path


def remove_temporaries(path: Path):
    """Delete leftover temporaries (from a killed write) in directory `path`."""
    for p in path.iterdir():
        if any(fnmatch.fnmatch(p.name, g) for g in TEMPORARY):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def replace_dir(build, out: Path):
    """Build a directory whole with `build(tmp)` and put it at `out` (claimed with `claim_dir`),
    replacing an earlier output; a failure leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):   # from a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(DIR_MODE)
    try:
        build(tmp)
        for p in tmp.iterdir():
            if p.is_file():
                p.chmod(FILE_MODE)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def markdown_table(table) -> str:
    """A pandas DataFrame as a Markdown table, floats to three significant digits."""
    def cell(v):
        return f"{v:,.3g}" if isinstance(v, float) else str(v)
    rows = [[str(c) for c in table.columns]] + [[cell(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(table.columns))
    return "\n".join(lines) + "\n"

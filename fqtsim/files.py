"""Output files: written whole or not at all (a temporary file beside the target, then rename),
output directories that never take what fqtsim did not write, tables as Markdown.

The rule for output directories (`claim_dir`): a command writes into a directory only if it is
new, empty, or recognisably an earlier output of the same command: every entry is a name that
command writes (`OUTPUTS`), none is a symbolic link, and its signature file is there with the
content that command gives it (names alone could be anyone's). It never writes into a directory
that holds one of its inputs or lies inside an input directory, nor into the current directory
or one of its parents. Anything else is refused with a message naming the path and what is in
the way. Temporaries carry ".fqtsim-" in their names, so no user file is taken for one.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _run_signature(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"hw", "mode", "quantizer", "hw_config"} <= set(config)


def _starts_with(text: str):
    def check(path: Path) -> bool:
        try:
            with open(path, errors="replace") as f:
                return f.read(len(text)) == text
        except OSError:
            return False
    return check


def _report_signature(path: Path) -> bool:
    """A report.md of fqtsim's, naming every file beside it (its plots and tables)."""
    if not _starts_with("# fqtsim overhead report")(path):
        return False
    text = path.read_text(errors="replace")
    return all(p.name in text for p in path.parent.iterdir()
               if p.name not in ("report.md", "report.html") and not is_temporary(p.name))


# What each command writes into its output directory: (signature file, check of its content,
# entry patterns)
OUTPUTS = {
    "run": ("config.json", _run_signature,
            ["config.json", "metrics.csv", "ledger.csv", "mapping.csv", "model.pt",
             "summary.json", "checkpoint.pt", "ledger-parts"]),
    "report": ("report.md", _report_signature, ["report.html", "report.md", "*.png", "*.csv"]),
    "sweep": ("results.csv", _starts_with("id,"), ["results.csv", "table.csv", "table.md", "points"]),
    "variance": ("variance.csv", _starts_with("model,layer,"),
                 ["variance.csv", "variance.png", "training"]),
}
TEMPORARY = ".*.fqtsim-*.tmp"   # write_atomic's files, replace_dir's folders


def is_temporary(name: str) -> bool:
    return fnmatch.fnmatch(name, TEMPORARY)


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.fqtsim-", suffix=".tmp")
    except OSError as e:   # name the file we were writing, not a temporary or nothing
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        # gone already if Ctrl-C landed after the rename: the file is whole, the interrupt stands
        with contextlib.suppress(FileNotFoundError):
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
    _, _, patterns = OUTPUTS[command]
    return sorted(p.name for p in path.iterdir() if p.is_symlink() or not (
        is_temporary(p.name) or any(fnmatch.fnmatch(p.name, g) for g in patterns)))


def claim_dir(path, command: str, inputs=(), option: str = "--out") -> Path:
    """Check that `command` may write directory `path` (see the module docstring); returns it
    as an absolute path with links resolved. `inputs`: files and directories the command reads.
    Creates nothing."""
    given = check_path(path, option)
    path = given.resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"{option}: {given} is the current directory or one above it; give a "
                         f"new directory for fqtsim {command}'s output")
    for item in map(lambda i: Path(i).resolve(), inputs):
        if item == path or path in item.parents:
            raise ValueError(f"{option}: {given} contains {item}, an input of this command; give "
                             f"another directory")
        if item.is_dir() and item in path.parents:
            raise ValueError(f"{option}: {given} lies inside {item}, an input of this command; "
                             f"give a directory outside it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option}: {given} is a file; give a directory")
    if path.is_dir() and any(not is_temporary(p.name) for p in path.iterdir()):
        signature, genuine, _ = OUTPUTS[command]
        foreign = foreign_entries(path, command)
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise ValueError(f"{option}: {given} holds {shown}, which fqtsim {command} did not "
                             f"write; give a new or empty directory, or remove what is there yourself")
        if not genuine(path / signature):
            raise ValueError(f"{option}: {given} is not an output of fqtsim {command} (no "
                             f"{signature} of its own); give a new or empty directory, or remove "
                             f"what is there yourself")
    return path


@contextmanager
def exclusive(path: Path):
    """Hold the lock of output directory `path` (a file beside it with the holder's pid): a
    second process that would write the same directory is refused; a lock whose process is gone
    (killed) is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.fqtsim-lock.tmp"
    mine = path.parent / f".{path.name}.fqtsim-lock-{os.getpid()}.tmp"
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, lock)   # appears whole, with our pid, or not at all
                break
            except FileExistsError:
                holder = _holder(lock)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    raise ValueError(f"--out: {path} is being written by process {holder}; wait "
                                     f"for it to finish or stop it") from None
                lock.unlink(missing_ok=True)   # its process is gone: take the lock over
    finally:
        mine.unlink()
    try:
        yield
    finally:
        if _holder(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def remove_temporaries(path: Path):
    """Delete leftover temporaries (from a killed write) in directory `path`."""
    for p in path.iterdir():
        if is_temporary(p.name) and not p.is_symlink():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def clear_dir(path: Path):
    """Empty a directory that `claim_dir` accepted (links are removed, never followed)."""
    for p in path.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def replace_dir(build, out: Path):
    """Build a directory whole with `build(tmp)` and put it at `out` (claimed with `claim_dir`),
    replacing an earlier output; a failure leaves `out` as it was."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.fqtsim-*.tmp"):   # from a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fqtsim-", suffix=".tmp"))
    tmp.chmod(DIR_MODE)   # mkdtemp's 0700 would carry over
    try:
        build(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.fqtsim-old.tmp")
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

"""English text that ships with the Python interpreter, for a character-level language model.

stdlib-docs: the docstrings of the standard library (every module, class and function docstring
that `ast.get_docstring` finds in the .py files of `sysconfig.get_paths()["stdlib"]`, in sorted
path order, test packages and site-packages left out), one document per docstring. About 1.8 M
characters on Python 3.11. Characters outside the vocabulary (newline and printable ASCII, 96
symbols) are dropped. Every 10th document is validation text, the others training text.

Built once per Python version (it depends on the interpreter's library) and cached, written
whole, under $FQTSIM_CACHE_DIR, else $XDG_CACHE_HOME/fqtsim, else ~/.cache/fqtsim; a cache that
cannot be written is skipped. No downloads.

`windows` cuts a text into the samples a model trains on: sequences of `context` tokens and the
same sequences one token later (the targets), at fixed offsets drawn from a fixed seed.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np

from fqtsim.files import write_atomic

log = logging.getLogger(__name__)

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))   # newline, then printable ASCII
VALIDATION_EVERY = 10   # every 10th document is validation text
_FORMAT = 1             # bump when what is collected changes


def cache_path() -> Path:
    base = os.environ.get("FQTSIM_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "fqtsim" if xdg else Path.home() / ".cache" / "fqtsim"
    version = ".".join(map(str, sys.version_info[:3]))
    return Path(base) / f"stdlib-docs-py{version}-v{_FORMAT}.json"


def stdlib_docs() -> tuple[str, str]:
    """(training text, validation text) of the standard library's docstrings."""
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
        return cached["train"], cached["validation"]
    except (OSError, ValueError, KeyError):
        pass
    docs = _docstrings(Path(sysconfig.get_paths()["stdlib"]))
    if not docs:
        raise ValueError(f"dataset stdlib-docs: no docstrings found under "
                         f"{sysconfig.get_paths()['stdlib']}; this interpreter ships no standard "
                         f"library sources, pick another --dataset")
    train = "\n\n".join(d for i, d in enumerate(docs) if i % VALIDATION_EVERY)
    validation = "\n\n".join(d for i, d in enumerate(docs) if not i % VALIDATION_EVERY)
    try:
        write_atomic(path, json.dumps({"train": train, "validation": validation}))
    except OSError as e:   # a read-only home: build it again next time
        log.warning(f"stdlib-docs: cache not written ({e})")
    return train, validation


def _docstrings(root: Path) -> list[str]:
    """Each docstring of the library's modules under `root`, in the vocabulary."""
    keep = set(VOCAB)
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in ("site-packages", "test", "tests") for p in parts[:-1]) or \
                parts[-1].startswith("test_"):
            continue
        try:
            with warnings.catch_warnings():   # old escapes in some sources
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a template or a file for another Python
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and (text := "".join(c for c in text if c in keep)):
                    docs.append(text)
    return docs


def encode(text: str) -> np.ndarray:
    """Token ids (int64) of `text`, whose characters are all in `VOCAB`."""
    table = np.full(128, -1, np.int64)
    table[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
    ids = table[np.frombuffer(text.encode("ascii"), np.uint8)]
    if (ids < 0).any():
        raise ValueError("encode: a character outside the vocabulary")
    return ids


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


def windows(ids: np.ndarray, context: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` sequences of `context` tokens at offsets drawn from `seed`, and their targets
    (each token's successor): two (count x context) int64 arrays."""
    if len(ids) <= context:
        raise ValueError(f"windows: a text of {len(ids)} tokens has no window of {context + 1}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - context, count)
    rows = starts[:, None] + np.arange(context + 1)
    return ids[rows[:, :-1]], ids[rows[:, 1:]]

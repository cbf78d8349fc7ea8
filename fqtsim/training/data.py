"""Datasets that ship with packages or generate offline: no downloads at run time.

    digits     scikit-learn's load_digits: 1,797 real 8x8 handwritten digits, in the package
    mnist1d    MNIST-1D (the mnist1d package's make_dataset, generated locally): 4,000 signals
               of length 40, 10 classes; never its download path
    synthetic  Gaussian class clusters in 64 dimensions (8x8), for fast tests
    stdlib-docs  text: the standard library's docstrings (`fqtsim.training.corpus`), as
               sequences of 64 characters whose targets are the next characters (a language
               model's task: `task` "lm")

Each image set returns a `Dataset` of float32 inputs shaped for the model (`flat` for an MLP,
`image` as N x C x H x W for a CNN) and int64 labels, split into train and test by the seed. The
text set's samples are int64 token ids (N x 64) with int64 targets of the same shape; its split
is fixed (the corpus's validation documents are its test set, whatever the seed), and its
windows are drawn once, from a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist1d", "synthetic", "stdlib-docs")
TEXT = {"context": 64, "train": 1024, "test": 256}   # stdlib-docs: characters per window, windows


def task(name: str) -> str:
    """What dataset `name` asks of a model: "lm" (next-token prediction) or "classify"."""
    return "lm" if name == "stdlib-docs" else "classify"


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple   # (C, H, W) of one sample; a text's: (tokens,)
    classes: int         # a text's: the vocabulary (each target is one of its tokens)
    task: str = "classify"   # or "lm": next-token prediction at every position

    def as_images(self) -> "Dataset":
        shape = (-1, *self.image_shape)
        return Dataset(self.name, self.x_train.reshape(shape), self.y_train,
                       self.x_test.reshape(shape), self.y_test, self.image_shape, self.classes)


def load(name: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load `name` with flat inputs; the train/test split is a permutation fixed by `seed` (a
    text's is fixed)."""
    if name == "stdlib-docs":
        return _text(name)
    if name == "digits":
        x, y = _digits()
        x, shape = x / 16.0, (1, 8, 8)
    elif name == "mnist1d":
        x, y = _mnist1d()
        shape = (1, 1, x.shape[1])
    elif name == "synthetic":
        x, y = _synthetic(np.random.default_rng(1234))
        shape = (1, 8, 8)
    else:
        raise ValueError(f"dataset: got {name!r}; expected one of {', '.join(DATASETS)}")
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    return Dataset(name, x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64),
                   shape, int(y.max()) + 1)


def _text(name: str) -> Dataset:
    from fqtsim.training import corpus

    train, validation = (corpus.encode(t) for t in corpus.stdlib_docs())
    context = TEXT["context"]
    x_train, y_train = corpus.windows(train, context, TEXT["train"], seed=0)
    x_test, y_test = corpus.windows(validation, context, TEXT["test"], seed=1)
    return Dataset(name, x_train, y_train, x_test, y_test, (context,), len(corpus.VOCAB), "lm")


def _digits():
    """scikit-learn's digits, read from the file its wheel ships (what load_digits reads),
    without importing scikit-learn (about a second of every run's start)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None else \
        Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        raise ValueError("dataset digits: scikit-learn's digits.csv.gz was not found; install "
                         "scikit-learn (pip install -c constraints.txt -e .) or pick another "
                         "--dataset")
    raw = np.loadtxt(path, delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(np.int64)


def _mnist1d(samples: int = 4000):
    """Generate MNIST-1D locally; the package seeds numpy's global RNG, so restore it after."""
    import mnist1d.data
    state = np.random.get_state()
    try:
        args = mnist1d.data.get_dataset_args()
        args.num_samples = samples
        data = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(state)
    return (np.concatenate([data["x"], data["x_test"]]),
            np.concatenate([data["y"], data["y_test"]]))


def _synthetic(rng: np.random.Generator, samples: int = 1000, classes: int = 10, dim: int = 64):
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, samples)
    return centres[y] + 0.8 * rng.standard_normal((samples, dim)), y

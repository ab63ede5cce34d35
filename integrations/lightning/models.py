"""A LightningModule around any timm or torchvision classifier, and seeded synthetic CIFAR-size data.

Example:
    >>> module = ImageClassifier("timm:test_resnet", num_classes=10)
    >>> module(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["build_model", "ImageClassifier", "SyntheticImages", "save_reference"]


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """``"timm:<name>"`` or ``"torchvision:<name>"``, randomly initialised (no pretrained weights)."""
    library, _, name = arch.partition(":")
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"arch must be 'timm:<name>' or 'torchvision:<name>', got {arch!r}")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier; the network is ``self.model`` (the callbacks' ``submodule="model"``)."""

    def __init__(
        self, arch: str = "timm:test_resnet", num_classes: int = 10, lr: float = 0.05, momentum: float = 0.9
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes)
        self.example_input_array = torch.zeros(2, 3, 32, 32)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        # SGD with momentum: its buffers must be permuted with the weights
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class SyntheticImages(pl.LightningDataModule):
    """Seeded 32x32 RGB images whose class sets a coloured blob position; learnable in a few steps."""

    def __init__(
        self, n_train: int = 64, n_val: int = 32, batch_size: int = 16, num_classes: int = 10, seed: int = 0
    ):
        super().__init__()
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size
        self.num_classes, self.seed = num_classes, seed

    def _make(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
        for i, c in enumerate(y.tolist()):
            r, col = divmod(c, 4)
            x[i, c % 3, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 2.0
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._make(self.n_train, self.seed)
        self.val_set = self._make(self.n_val, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        # fixed order: a shuffling loader's generator is not part of Lightning checkpoints
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def save_reference(path: str, arch: str = "timm:test_resnet", seed: int = 123) -> str:
    """Save a randomly initialised reference network's state dict (the callbacks' ``reference``)."""
    torch.manual_seed(seed)
    torch.save(build_model(arch).state_dict(), path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save a reference state dict for the LightningCLI config.")
    parser.add_argument("--save-reference", required=True, metavar="PATH")
    parser.add_argument("--arch", default="timm:test_resnet")
    args = parser.parse_args()
    print(save_reference(args.save_reference, args.arch))

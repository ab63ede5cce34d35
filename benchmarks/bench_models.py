"""Small MNIST models the benchmarks train (an MLP, a VGG-style CNN with BatchNorm, a ResNet-8 with
BatchNorm), shared so every benchmark measures the same architectures; and, for the Lightning benchmarks,
a LightningModule around any network with seeded synthetic CIFAR-size images."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "mlp",
    "small_vgg",
    "BasicBlock",
    "SmallResNet",
    "lit_classifier",
    "synthetic_images",
    "train_classifier",
    "head",
]


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def small_vgg(width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(1, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, 10),
    )  # fmt: skip


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8 for 1-channel images: stem, three basic blocks (c, 2c, 4c channels), pooling, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        c = (width, 2 * width, 4 * width)
        self.conv = nn.Conv2d(1, c[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c[0])
        self.layer1 = BasicBlock(c[0], c[0])
        self.layer2 = BasicBlock(c[0], c[1], 2)
        self.layer3 = BasicBlock(c[1], c[2], 2)
        self.fc = nn.Linear(c[2], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def synthetic_images(n: int, seed: int, num_classes: int = 10) -> torch.utils.data.TensorDataset:
    """Seeded 32x32 RGB images whose class sets a bright square's position: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 4)
        x[i, c % 3, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 2.0
    return torch.utils.data.TensorDataset(x, y)


def lit_classifier(net: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> nn.Module:
    """A cross-entropy LightningModule whose network is ``self.model`` (the callbacks' ``submodule``), with
    SGD momentum (buffers the callbacks must permute with the weights)."""
    import lightning.pytorch as pl

    class LitClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)

    return LitClassifier()


def train_classifier(
    make: Callable[[], nn.Module],
    seed: int,
    data: torch.utils.data.Dataset,
    epochs: int,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> nn.Module:
    """``make()`` built under ``seed`` and trained with cross-entropy for ``epochs`` (batches of 128, shuffled by
    a generator of the same seed; Adam 1e-3 unless ``optimizer`` builds another), returned in eval mode: the
    one training loop of the trained-pair benchmarks, so a seed gives the same model in each."""
    torch.manual_seed(seed)
    model = make()
    opt = optimizer(model.parameters()) if optimizer else torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def head(data: torch.utils.data.TensorDataset, n: int) -> torch.utils.data.TensorDataset:
    """The first ``n`` examples (all when ``n`` is 0 or more than there are); slicing, not a slow Subset."""
    if not n or n >= len(data):
        return data
    return torch.utils.data.TensorDataset(*(t[:n] for t in data.tensors))

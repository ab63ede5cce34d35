"""ReBasinFusion across successive ``trainer.fit`` calls (one per episode) on real digits."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from rebasin_callbacks.data import digits, rotated  # noqa: E402
from rebasin_callbacks.incremental import JointOptimizer  # noqa: E402
from rebasin_callbacks.lightning_fusion import ReBasinFusion  # noqa: E402
from rebasin_callbacks.spec import PermutationSpec  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        self.optimizers_seen: list[type] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == 0:
            self.optimizers_seen.append(type(self.trainer.optimizers[0]))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader(degrees: float) -> DataLoader:
    ds = rotated(digits(train=True, flatten=True), degrees)
    return DataLoader(TensorDataset(*ds.tensors), batch_size=128, shuffle=True)


def _loss(net: Net, degrees: float) -> float:
    x, y = rotated(digits(train=True, flatten=True), degrees).tensors
    with torch.no_grad():
        return F.cross_entropy(net(x), y).item()


def _fit(net: Net, callback: ReBasinFusion, degrees: float, epochs: int = 3) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader(degrees))


def test_fusion_across_fits() -> None:
    torch.manual_seed(0)
    net = Net()
    spec = PermutationSpec.from_axes(
        {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)},
        net.model.state_dict(),
    )
    fusion = ReBasinFusion(alpha=0.8, beta=1e-3, lr_delta=0.5, spec=spec, submodule="model")
    _fit(net, fusion, 0.0)
    assert fusion.fits_completed == 1 and fusion.incremental is not None
    assert fusion.incremental.episodes_done == 0
    theta = {k: v.clone() for k, v in net.state_dict().items()}
    before = _loss(net, 90.0)
    _fit(net, fusion, 90.0)
    # second fit: the episode's joint optimizer trained P and delta, then the fused model was written back
    assert net.optimizers_seen == [torch.optim.Adam] * 3 + [JointOptimizer] * 3
    assert fusion.incremental.episodes_done == 1 and not fusion.incremental.in_episode
    assert any(not torch.equal(theta[k], v) for k, v in net.state_dict().items())
    assert _loss(net, 90.0) < before
    # the module is left as it was: no instance-level patches remain
    assert not {"training_step", "validation_step", "configure_optimizers"} & set(vars(net))
    state = fusion.state_dict()
    other = ReBasinFusion(spec=spec, submodule="model")
    other.load_state_dict(state)
    assert other.fits_completed == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ReBasinFusion(alpha=2.0)
    with pytest.raises(ValueError, match="fusion"):
        ReBasinFusion(fusion="mean")  # type: ignore[arg-type]


def test_traced_spec_follows_the_models_dtype() -> None:
    """float32 example inputs, a float64 model: the spec is traced on inputs cast to the model's dtype."""
    torch.manual_seed(0)
    net = Net().double()
    fusion = ReBasinFusion(alpha=0.8, beta=1e-3, example_inputs=torch.zeros(2, 64), submodule="model")
    for degrees in (0.0, 90.0):
        x, y = rotated(digits(train=True, flatten=True), degrees).tensors
        loader = DataLoader(TensorDataset(x.double(), y), batch_size=128, shuffle=True)
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[fusion],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(net, loader)
    assert fusion.incremental is not None and fusion.incremental.episodes_done == 1
    assert net.model[0].weight.dtype == torch.float64

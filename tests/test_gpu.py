"""The main paths on a CUDA device, under PyTorch's default TF32 settings (skipped without a GPU).

Run on a GPU machine with ``python -m pytest tests/test_gpu.py -m gpu -q``. Every test here also runs its
CPU counterpart's checks where the answer must be the same (the traced groups, the function preserved).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def default_tf32():
    """PyTorch's defaults on CUDA: cuDNN convolutions in TF32; matmuls in TF32 too (the stricter case)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def _batches(n: int = 4, device: str = "cuda") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(32, 8, generator=g).to(device), torch.randint(0, 3, (32,), generator=g).to(device))
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- core
@pytest.mark.parametrize("name", ["resnet50", "vgg11"])
def test_trace_finds_the_cpu_groups_on_cuda(name):
    torchvision = pytest.importorskip("torchvision")
    from rebasin_callbacks import trace_spec

    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    cpu = trace_spec(model, x)
    gpu = trace_spec(copy.deepcopy(model).cuda(), x.cuda())
    assert gpu.sizes == cpu.sizes
    assert gpu.axes_to_perm == cpu.axes_to_perm


def test_align_resnet18_on_cuda_keeps_the_function():
    torchvision = pytest.importorskip("torchvision")
    from rebasin_callbacks import align

    torch.manual_seed(0)
    a = torchvision.models.resnet18(num_classes=10).cuda().eval()
    b = torchvision.models.resnet18(num_classes=10).cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    result = align(b, a, example_inputs=x, steps=5, progress=False)
    assert next(result.model.parameters()).is_cuda
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.testing.assert_close(result.model(x), b(x), rtol=1e-4, atol=1e-4)


def test_align_reference_on_another_device_and_dtype():
    from rebasin_callbacks import align

    model, reference = _mlp(0).cuda().eval(), _mlp(1).double().eval()  # reference: CPU, float64
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    result = align(model, reference, example_inputs=torch.randn(4, 8, device="cuda"), steps=5, progress=False)
    assert next(result.model.parameters()).is_cuda and next(result.model.parameters()).dtype == torch.float32
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]) and v.device.type == "cpu"


def test_lmc_curve_reset_bn_repair_across_devices():
    from rebasin_callbacks import lmc_curve
    from rebasin_callbacks.lmc import interpolate, repair, reset_bn_stats

    a, b = _mlp(0).cuda(), _mlp(1)  # model_b on the CPU: copied to model_a's device, never moved
    data = _batches()
    res = lmc_curve(a, b, data, n_points=3, reset_bn=True, repair=True, progress=False)
    assert len(res.values["loss"]) == 3 and all(v == v for v in res.values["loss"])
    assert next(b.parameters()).device.type == "cpu"
    mid = interpolate(a, b, 0.5)
    assert next(mid.parameters()).is_cuda
    reset_bn_stats(mid, data)
    repair(a, b, mid, 0.5, data)
    cpu = lmc_curve(a.cpu(), b, _batches(device="cpu"), n_points=3, progress=False)
    gpu = lmc_curve(a.cuda(), b, data, n_points=3, progress=False)
    assert gpu.values["loss"] == pytest.approx(cpu.values["loss"], rel=1e-2)


# ----------------------------------------------------------------------------- Lightning
pl = pytest.importorskip("lightning.pytorch")


class Net(pl.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.model = _mlp(seed)
        self.losses: list[float] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loaders():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (128,), generator=g)
    x = torch.randn(128, 8, generator=g) + 2 * F.one_hot(y, 8).float()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=32, shuffle=True, generator=g), DataLoader(ds, batch_size=64)


def _trainer(tmp_path, callbacks, epochs=2):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


def test_align_and_monitor_in_a_gpu_trainer(tmp_path):
    from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign

    reference = _mlp(5)  # on the CPU: the callbacks copy it to the trained model's device
    aligner = ReBasinAlign(reference, submodule="model")
    monitor = LMCMonitor(reference, submodule="model", n_points=3, reset_bn=True, save_dir=str(tmp_path))
    _trainer(tmp_path, [aligner, monitor]).fit(Net(), *_loaders())
    assert len(aligner.history) == 2 and aligner.history[0]["l2_after"] < aligner.history[0]["l2_before"]
    for res in monitor.results:
        assert res["naive"].values["loss"] != pytest.approx(res["rebasin"].values["loss"], rel=1e-3)


def test_fusion_in_a_gpu_trainer(tmp_path):
    from rebasin_callbacks.lightning_fusion import ReBasinFusion

    net = Net()
    fusion = ReBasinFusion(alpha=0.8, beta=0.1, submodule="model", example_inputs=torch.zeros(2, 8))
    for _ in range(2):
        _trainer(tmp_path, [fusion], epochs=1).fit(net, *_loaders())
    assert fusion.fits_completed == 2 and fusion.incremental is not None
    assert fusion.incremental.episodes_done == 1


# ----------------------------------------------------------------------------- demo and an example
def test_demo_smoke_on_gpu(tmp_path, capsys):
    from rebasin_callbacks.cli import main

    assert main(["demo", "--smoke", "--no-progress", "--out", str(tmp_path / "demo")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["device"] == "cuda"
    ends = {label: c["values"]["loss"][0] for label, c in results["lmc"].items()}
    assert max(ends.values()) == pytest.approx(min(ends.values()), rel=1e-3)


@pytest.mark.parametrize("name", ["align_resnet", "lmc_mlp"])
def test_example_on_gpu(name, tmp_path):
    pytest.importorskip("matplotlib")
    if name == "align_resnet":
        pytest.importorskip("torchvision")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / f"{name}.py"),
            "--smoke",
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

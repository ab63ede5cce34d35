"""Re-basin inside a Lightning Trainer: LMCMonitor and ReBasinAlign with a checkpoint as the reference.

Model A is trained with Lightning and saved as a ``.ckpt``. Model B is trained from another seed with two
callbacks that take that checkpoint as their reference:

* :class:`~rebasin_callbacks.lightning.LMCMonitor`: after every epoch, the loss / accuracy barrier between
  B and A, naive and after re-basin (logged, and a PNG of the curves per epoch);
* :class:`~rebasin_callbacks.lightning.ReBasinAlign` (``mode="copy"``): when fitting ends, a copy of B
  permuted into A's basin (``aligned_model``), saved as a plain state dict.

    python examples/lightning_callbacks.py            # about a minute on 2 CPU cores
    python examples/lightning_callbacks.py --smoke    # seconds

Pictures in --out (default outputs/lightning_callbacks): barriers.png (barrier to A after each epoch of
B's training, naive vs re-based) and lmc_epoch<N>.png from the monitor.
"""

import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import mlp, mnist_loaders, parse_args
from matplotlib.figure import Figure

from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign

warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
args = parse_args("lightning_callbacks", __doc__.splitlines()[0])
width, epochs = (32, 2) if args.smoke else (512, 5)
train_loader, test_loader = mnist_loaders(args, flatten=True)


class Classifier(pl.LightningModule):
    """An MLP under ``self.model``; the callbacks align / compare that submodule."""

    def __init__(self, width: int):
        super().__init__()
        self.save_hyperparameters()
        self.model = mlp(width)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def trainer(callbacks=()):
    # --device (default: the GPU when there is one) picks the accelerator
    accelerator = "gpu" if str(args.device).startswith("cuda") else "cpu"
    return pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=args.out)  # fmt: skip


# 1. model A, saved as a Lightning checkpoint
pl.seed_everything(args.seed, verbose=False)
model_a = Classifier(width)
fit_a = trainer()
fit_a.fit(model_a, train_loader, test_loader)
fit_a.save_checkpoint(args.out / "model_a.ckpt")
print(f"model A saved: {args.out / 'model_a.ckpt'}")

# 2. model B with the callbacks; the reference is the checkpoint (its "model." key prefix is matched)
pl.seed_everything(args.seed + 1, verbose=False)
align_kwargs = {"steps": 20 if args.smoke else 200, "seed": args.seed, "progress": False}
monitor = LMCMonitor(str(args.out / "model_a.ckpt"), submodule="model", n_points=5 if args.smoke else 11,
                     align_kwargs=align_kwargs, save_dir=str(args.out))  # fmt: skip
aligner = ReBasinAlign(str(args.out / "model_a.ckpt"), submodule="model", mode="copy", every_n_epochs=0,
                       at_fit_end=True, align_kwargs=align_kwargs)  # fmt: skip
trainer([monitor, aligner]).fit(Classifier(width), train_loader, test_loader)
torch.save(
    {k: v.cpu() for k, v in aligner.aligned_model.state_dict().items()}, args.out / "model_b_aligned.pt"
)

# 3. the barrier to A after each epoch of B's training, naive vs re-based
for h in monitor.history:
    print(
        f"  epoch {int(h['epoch'])}: loss barrier naive {h['lmc/naive_barrier']:.3f}, re-based {h['lmc/rebasin_barrier']:.3f}"
    )
fig = Figure(figsize=(4.5, 3.4), layout="constrained")
ax = fig.add_subplot()
epochs_seen = [int(h["epoch"]) + 1 for h in monitor.history]
ax.plot(epochs_seen, [h["lmc/naive_barrier"] for h in monitor.history], "o--", color="0.5", label="naive")
ax.plot(
    epochs_seen, [h["lmc/rebasin_barrier"] for h in monitor.history], "o-", color="tab:red", label="re-based"
)
ax.set(xlabel="epoch of model B", ylabel="loss barrier to model A", title="LMCMonitor during training")
ax.grid(alpha=0.3)
ax.legend()
fig.savefig(args.out / "barriers.png", dpi=80)
print(f"  plot: {args.out / 'barriers.png'}; aligned copy of B: {args.out / 'model_b_aligned.pt'}")

"""Fit with ReBasinAlign and LMCMonitor under DDP on CPU processes; save every rank's final state.

``python -m integrations.lightning.ddp_run OUT_DIR [--devices 2] [--arch timm:test_resnet]`` writes
``OUT_DIR/rank{r}.pt`` = ``{"state_dict", "perms", "align_history", "lmc_history"}`` for every rank, so a
test can check that all ranks end with identical weights and permutations. Lightning re-launches this
module once per extra rank (``strategy="ddp"``, gloo backend on CPU).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from integrations.lightning.models import ImageClassifier, SyntheticImages, save_reference
from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--arch", default="timm:test_resnet")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args.out.mkdir(parents=True, exist_ok=True)
    reference = args.out / "reference.pt"
    if not reference.exists():  # every rank runs this file; rank 0 is started first and writes it
        save_reference(str(reference), args.arch)

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(args.arch)
    kwargs = {"align_kwargs": {"steps": 5, "seed": 0}, "submodule": "model"}
    align = ReBasinAlign(str(reference), every_n_epochs=1, **kwargs)
    monitor = LMCMonitor(str(reference), n_points=3, max_batches=1, save_dir=str(args.out / "lmc"), **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=args.epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[align, monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=SyntheticImages(n_train=64, n_val=32, batch_size=16))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "perms": align.last_perms,
            "align_history": align.history,
            "lmc_history": monitor.history,
            "world_size": trainer.world_size,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()

"""End-to-end suite of the Lightning callbacks on a timm / torchvision model.

* ``models.py``: ``ImageClassifier`` (any timm or torchvision architecture by name) and ``SyntheticImages``
  (a seeded CIFAR-size data module; no download), shared by the tests, the DDP script and the CLI config.
* ``ddp_run.py``: ``python -m integrations.lightning.ddp_run OUT_DIR`` fits with both callbacks under DDP on
  2 CPU processes (gloo) and saves every rank's final weights and permutations.
* ``config.yaml``: a LightningCLI configuration that instantiates ``ReBasinAlign`` and ``LMCMonitor``:
  ``python -m integrations.lightning.models --save-reference reference.ckpt`` then
  ``python -m integrations.lightning.cli fit --config integrations/lightning/config.yaml``.
* ``test_end_to_end.py``: all of the above, run by CI.
"""

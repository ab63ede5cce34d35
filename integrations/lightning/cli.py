"""LightningCLI entry point for the end-to-end config: ``python -m integrations.lightning.cli fit --config ...``.

Example:
    $ python -m integrations.lightning.models --save-reference reference.ckpt
    $ python -m integrations.lightning.cli fit --config integrations/lightning/config.yaml
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from integrations.lightning.models import ImageClassifier, SyntheticImages


def main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run`` execute) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    return LightningCLI(
        ImageClassifier, SyntheticImages, args=list(args) if args is not None else None, run=run
    )


if __name__ == "__main__":
    main()

"""rebasin-callbacks: differentiable Sinkhorn re-basin inside the training loops you already use.

Everything is importable from the package root; framework adapters live in their own modules
(``rebasin_callbacks.lightning``, ``rebasin_callbacks.avalanche``) so importing the root never imports
Lightning or Avalanche. Names are resolved lazily (PEP 562), which keeps ``import rebasin_callbacks`` fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "sinkhorn": "sinkhorn",
    "PermutationSpec": "spec",
    "SpecMismatchError": "spec",
    "permute": "permute",
    "permute_state_dict": "permute",
    "random_permutations": "permute",
    "identity_permutations": "permute",
    "invert_permutation": "permute",
    "trace_spec": "trace",
    "check_spec": "trace",
    "ReBasin": "rebasin",
    "PermutedView": "rebasin",
    "align": "align",
    "AlignResult": "align",
    "weight_matching": "matching",
    "L2Cost": "costs",
    "MidCost": "costs",
    "RndCost": "costs",
    "CosineCost": "costs",
    "interpolate": "lmc",
    "lmc_curve": "lmc",
    "LMCResult": "lmc",
    "reset_bn_stats": "lmc",
    "repair": "lmc",
    "plot_lmc": "lmc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rebasin_callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rebasin_callbacks.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover - static names for type checkers and IDEs
    from rebasin_callbacks.permute import (
        identity_permutations,
        invert_permutation,
        permute,
        permute_state_dict,
        random_permutations,
    )
    from rebasin_callbacks.rebasin import PermutedView, ReBasin
    from rebasin_callbacks.sinkhorn import sinkhorn
    from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError

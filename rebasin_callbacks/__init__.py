"""rebasin-callbacks: differentiable Sinkhorn re-basin inside the training loops you already use.

Everything is importable from the package root. Framework adapters live in their own modules
(``rebasin_callbacks.lightning``, ``rebasin_callbacks.avalanche``) so importing the root never imports
Lightning, Avalanche or timm. The exports are imported on first use, so ``import rebasin_callbacks`` (and the
``rebasin`` command's ``--help``) does not wait for torch.

Example:
    >>> import torch
    >>> from rebasin_callbacks import align, permute, random_permutations, trace_spec
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> spec = trace_spec(mlp, torch.randn(2, 4))
    >>> planted = permute(mlp, spec, random_permutations(spec, torch.Generator().manual_seed(0)))
    >>> result = align(planted, mlp, spec=spec, progress=False)
    >>> all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), mlp.state_dict().values()))
    True
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

#: module (under the package) -> the public names it defines
_MODULES: dict[str, tuple[str, ...]] = {
    "align": ("AlignResult", "align"),
    "costs": ("CosineCost", "L2Cost", "MidCost", "RndCost"),
    "incremental": ("ReBasinIncremental",),
    "lmc": (
        "LMCResult",
        "barrier_and_auc",
        "evaluate_model",
        "interpolate",
        "interpolate_state_dict",
        "lmc_curve",
        "plot_lmc",
        "repair",
        "reset_bn_stats",
    ),
    "matching": ("weight_matching",),
    "merge": ("MergeEvaluation", "MergeResult", "average_models", "evaluate_merge", "merge"),
    "permute": (
        "identity_permutations",
        "invert_permutation",
        "permute",
        "permute_state_dict",
        "random_permutations",
    ),
    "rebasin": ("PermutedView", "ReBasin"),
    "settings": ("SinkhornSettings",),
    "sinkhorn": ("SinkhornConvergenceWarning", "SinkhornInfo", "sinkhorn"),
    "spec": ("PermutationSpec", "SpecMismatchError"),
    "trace": ("SpecCheckError", "UntraceableModelError", "check_compatible", "check_spec", "trace_spec"),
    "trace_rules": (
        "TraceRule",
        "register_boundary",
        "register_channel_preserving",
        "register_elementwise",
        "trace_rules",
    ),
}
#: export -> the module defining it
_EXPORTS: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}


class _Package(types.ModuleType):
    """The package module: exports resolved on first access (PEP 562 alone is not enough, see below)."""

    def __getattr__(self, name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on the package: the module ``rebasin_callbacks.align`` would then
        # shadow the function ``align`` for ``from rebasin_callbacks import align``. Exports win.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # type checkers and IDEs see the same names, imported eagerly
    from rebasin_callbacks.align import AlignResult, align
    from rebasin_callbacks.costs import CosineCost, L2Cost, MidCost, RndCost
    from rebasin_callbacks.incremental import ReBasinIncremental
    from rebasin_callbacks.lmc import (
        LMCResult,
        barrier_and_auc,
        evaluate_model,
        interpolate,
        interpolate_state_dict,
        lmc_curve,
        plot_lmc,
        repair,
        reset_bn_stats,
    )
    from rebasin_callbacks.matching import weight_matching
    from rebasin_callbacks.merge import MergeEvaluation, MergeResult, average_models, evaluate_merge, merge
    from rebasin_callbacks.permute import (
        identity_permutations,
        invert_permutation,
        permute,
        permute_state_dict,
        random_permutations,
    )
    from rebasin_callbacks.rebasin import PermutedView, ReBasin
    from rebasin_callbacks.settings import SinkhornSettings
    from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning, SinkhornInfo, sinkhorn
    from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
    from rebasin_callbacks.trace import (
        SpecCheckError,
        UntraceableModelError,
        check_compatible,
        check_spec,
        trace_spec,
    )
    from rebasin_callbacks.trace_rules import (
        TraceRule,
        register_boundary,
        register_channel_preserving,
        register_elementwise,
        trace_rules,
    )

__version__ = "0.1.0"

__all__ = [
    "AlignResult",
    "CosineCost",
    "L2Cost",
    "LMCResult",
    "MergeEvaluation",
    "MergeResult",
    "MidCost",
    "PermutationSpec",
    "PermutedView",
    "ReBasin",
    "ReBasinIncremental",
    "RndCost",
    "SinkhornConvergenceWarning",
    "SinkhornInfo",
    "SinkhornSettings",
    "SpecCheckError",
    "SpecMismatchError",
    "TraceRule",
    "UntraceableModelError",
    "align",
    "average_models",
    "barrier_and_auc",
    "check_compatible",
    "check_spec",
    "evaluate_merge",
    "evaluate_model",
    "identity_permutations",
    "interpolate",
    "interpolate_state_dict",
    "invert_permutation",
    "lmc_curve",
    "merge",
    "permute",
    "permute_state_dict",
    "plot_lmc",
    "random_permutations",
    "register_boundary",
    "register_channel_preserving",
    "register_elementwise",
    "repair",
    "reset_bn_stats",
    "sinkhorn",
    "trace_rules",
    "trace_spec",
    "weight_matching",
]

"""rebasin-callbacks: differentiable Sinkhorn re-basin inside the training loops you already use.

Everything is importable from the package root. Framework adapters live in their own modules
(``rebasin_callbacks.lightning``, ``rebasin_callbacks.avalanche``) so importing the root never imports
Lightning, Avalanche or timm.

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

# Imported eagerly: a lazy export would be shadowed by the submodule of the same name
# (``rebasin_callbacks.align`` the module vs ``align`` the function) once anything imports it.
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
    "MidCost",
    "PermutationSpec",
    "PermutedView",
    "ReBasin",
    "ReBasinIncremental",
    "RndCost",
    "SpecCheckError",
    "SpecMismatchError",
    "TraceRule",
    "UntraceableModelError",
    "align",
    "barrier_and_auc",
    "check_compatible",
    "check_spec",
    "evaluate_model",
    "identity_permutations",
    "interpolate",
    "interpolate_state_dict",
    "invert_permutation",
    "lmc_curve",
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
    "trace_spec",
    "trace_rules",
    "weight_matching",
]

"""Attention heads as units: a block group permutes whole heads, the unit groups permute inside them.

The spec, ``permute``, ``check_spec`` (float64), the soft application used by ``ReBasin`` and weight matching
must all agree on it, and a head permutation that breaks the function must be caught."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import perm_to_matrix, permute, permute_state_dict, random_permutations
from rebasin_callbacks.rebasin import apply_soft_permutations
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.trace import SpecCheckError, _drop_groups, check_spec, trace_spec
from rebasin_callbacks.utils import l2_distance

timm = pytest.importorskip("timm")


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=4,
        mlp_ratio=2.0, global_pool="avg", class_token=False,
    ).eval()  # fmt: skip


class _MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(a + h)


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_spec(model, x)


def test_vit_head_groups_are_traced_and_keep_the_function():
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(3, 1, 28, 28)
    spec = _trace(model, x)
    assert spec.block_groups == {"P_blocks.0.attn.heads", "P_blocks.1.attn.heads"}
    h = "P_blocks.0.attn.heads"
    assert spec.sizes[h] == 4
    assert spec.block_axes["blocks.0.attn.qkv.weight"] == (((h, 12),) * 3, None)
    assert spec.block_axes["blocks.0.attn.proj.weight"] == (None, ((h, 12),))
    assert spec.check_error is not None and spec.check_error < 1e-12
    # permuting heads alone, and heads with units, keeps the outputs; heads do move
    for only_heads in (True, False):
        perms = random_permutations(spec, 5)
        if only_heads:
            perms = {g: p for g, p in perms.items() if g in spec.block_groups}
        assert not torch.equal(perms[h], torch.arange(4))
        moved = permute(model, spec, perms)
        assert l2_distance(moved, model) > 0
        torch.testing.assert_close(moved(x), model(x), atol=1e-5, rtol=1e-5)
    assert PermutationSpec.from_json(spec.to_json()) == spec


def test_multihead_attention_head_group():
    torch.manual_seed(0)
    model, x = _MHABlock().eval(), torch.randn(2, 7, 5)
    spec = _trace(model, x)
    assert spec.block_groups == {"P_attn.heads"}
    assert spec.block_axes["attn.in_proj_weight"][0] == (("P_attn.heads", 4),) * 3
    assert spec.block_axes["attn.out_proj.weight"] == (None, (("P_attn.heads", 4),))
    moved = permute(model, spec, random_permutations(spec, 2))
    torch.testing.assert_close(moved(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_head_permutation_missing_on_proj_is_caught():
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 1, 28, 28)
    spec = _trace(model, x)
    h = "P_blocks.0.attn.heads"
    wrong = dict(spec.block_axes)
    del wrong["blocks.0.attn.proj.weight"]  # heads move in qkv but proj still reads them in place
    broken = PermutationSpec.from_axes(
        spec.axes_to_perm, model.state_dict(), sizes=spec.sizes, block_axes=wrong
    )
    with pytest.raises(SpecCheckError) as err:
        check_spec(model, broken, x)
    assert h in err.value.failing


def test_a_group_on_both_levels_is_refused():
    state = nn.Linear(4, 8).state_dict()
    with pytest.raises(SpecMismatchError, match="both"):
        PermutationSpec.from_axes({"weight": ("P", None)}, state, block_axes={"weight": ((("P", 2),), None)})


def test_soft_application_with_hard_matrices_equals_permute():
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 1, 28, 28)
    spec = _trace(model, x)
    perms = random_permutations(spec, 7)
    state = {k: v.double() for k, v in model.state_dict().items()}
    hard = permute_state_dict(state, spec, perms)
    soft = apply_soft_permutations(
        state, spec, {g: perm_to_matrix(p, torch.float64) for g, p in perms.items()}
    )
    for key in spec.axes_to_perm:
        torch.testing.assert_close(soft[key], hard[key], atol=1e-12, rtol=0)


def test_weight_matching_recovers_planted_heads_only_with_head_groups():
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 1, 28, 28)
    spec = _trace(model, x)
    planted = permute(model, spec, random_permutations(spec, 3))
    perms = weight_matching(planted, model, spec)
    assert l2_distance(permute(planted, spec, perms), model) < 1e-6
    flat = _drop_groups(spec, spec.block_groups, model.state_dict())
    assert not flat.block_axes and len(flat) == len(spec) - 2
    perms = weight_matching(planted, model, flat)
    assert l2_distance(permute(planted, flat, perms), model) > 1.0  # heads cannot be moved without them


class _GroupedQueryAttention(nn.Module):
    """8 query heads share 2 key/value heads (written op by op, as LLM code does)."""

    def __init__(self, dim: int = 32, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.proj = nn.Linear(dim, dim)
        self.inp = nn.Linear(6, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1)) + x


def test_grouped_query_attention_is_a_boundary_never_wrong():
    torch.manual_seed(0)
    model, x = _GroupedQueryAttention().eval(), torch.randn(2, 5, 6)
    with pytest.warns(UserWarning, match="boundar"):
        spec = trace_spec(model, x)
    assert not spec.block_groups  # heads are not followed through per-head reshapes
    for key in ("q.weight", "kv.weight", "proj.weight"):
        assert spec.axes_to_perm[key][0 if key != "proj.weight" else 1] is None
    assert check_spec(model, spec, x) < 1e-9


def test_compose_and_invert_with_head_groups():
    from rebasin_callbacks.permute import compose_permutations, invert_permutations

    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 1, 28, 28)
    spec = _trace(model, x)
    p1, p2 = random_permutations(spec, 1), random_permutations(spec, 2)
    state = model.state_dict()
    twice = permute_state_dict(permute_state_dict(state, spec, p1), spec, p2)
    once = permute_state_dict(state, spec, compose_permutations(spec, p1, p2))
    groupwise = permute_state_dict(state, spec, {g: p1[g][p2[g]] for g in p1})
    assert all(torch.equal(twice[k], once[k]) for k in state)
    assert not all(torch.equal(twice[k], groupwise[k]) for k in state)  # heads make it more than groupwise
    back = permute_state_dict(permute_state_dict(state, spec, p1), spec, invert_permutations(spec, p1))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_data_free_refinement_gives_heads_a_gradient():
    # The closed-form L2 step has no gradient for block groups: with heads in the spec the straight-through
    # step runs by autograd, so the head scores get one and whole heads can move.
    from rebasin_callbacks.align import ALIGN_START, _plan
    from rebasin_callbacks.costs import L2Cost, cost_hints
    from rebasin_callbacks.permute import identity_permutations
    from rebasin_callbacks.rebasin import ReBasin
    from rebasin_callbacks.refine import Problem, _prepare, _start, _step_ste

    torch.manual_seed(0)
    model, x = _vit(), torch.randn(2, 1, 28, 28)
    spec = _trace(model, x)
    perms = identity_permutations(spec)
    perms["P_blocks.0.attn.heads"] = torch.tensor([2, 3, 0, 1])
    planted = permute(model, spec, perms)
    cost = L2Cost()
    plan = _plan(ALIGN_START, cost_hints(cost), init="identity", lr="auto", method="auto", steps=1,
                 early_stopping=None, polish=False)  # fmt: skip
    problem = Problem(planted, model, spec, cost)
    rb = ReBasin(planted, spec, init=identity_permutations(spec), settings=plan.settings.merged(seed=0))
    score, _, best, _ = _start(problem, identity_permutations(spec), rb)
    run = _prepare(problem, plan, rb, score, best)
    assert run.gradient is None  # no closed form: it would leave the heads out
    run.opt.zero_grad(set_to_none=True)
    _step_ste(run, 1, None)
    bucket, i = rb._where["P_blocks.0.attn.heads"]
    grad = rb.scores[bucket].grad
    assert grad is not None and grad[i].abs().max() > 0

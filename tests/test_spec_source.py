"""One spec resolver: every source gives the same new spec with sizes bound; the caller's spec is untouched."""

from __future__ import annotations

import pytest
import torch
from _align_models import mlp, mlp_spec

from rebasin_callbacks import PermutationSpec, ReBasin, SpecMismatchError, weight_matching
from rebasin_callbacks.incremental import ReBasinIncremental
from rebasin_callbacks.spec_source import resolve_spec


def _unsized(model: torch.nn.Module) -> PermutationSpec:
    spec = mlp_spec(model)
    return PermutationSpec(perm_to_axes=spec.perm_to_axes, axes_to_perm=spec.axes_to_perm)


def test_every_source_gives_the_same_spec(tmp_path) -> None:
    model = mlp([4, 8, 6, 3], seed=0)
    given = _unsized(model)
    path = tmp_path / "spec.json"
    given.to_json(path)
    x = torch.randn(2, 4)
    from_spec = resolve_spec(model, given)
    assert from_spec.sizes == {"P0": 8, "P1": 6}
    assert resolve_spec(model, lambda m: _unsized(m)).sizes == from_spec.sizes
    assert resolve_spec(model, str(path)) == from_spec
    assert resolve_spec(model, path) == from_spec
    traced = resolve_spec(model, example_inputs=x)
    assert sorted(traced.sizes.values()) == [6, 8]
    assert resolve_spec(model, batch=(x, torch.zeros(2))).axes_to_perm == traced.axes_to_perm
    with pytest.warns(UserWarning, match="tracing on random inputs"):
        assert resolve_spec(model).axes_to_perm == traced.axes_to_perm


def test_the_callers_spec_is_never_modified() -> None:
    model = mlp([4, 8, 3], seed=0)
    given = _unsized(model)
    rb = ReBasin(model, given)
    weight_matching(model, model, given)
    weight_matching(model.state_dict(), model.state_dict(), given)
    ReBasinIncremental(model, spec=given).begin_episode()
    assert given.sizes == {}
    assert rb.spec.sizes == {"P0": 8} and rb.spec is not given


def test_bad_sources_are_named() -> None:
    model = mlp([4, 8, 3], seed=0)
    with pytest.raises(TypeError, match="the spec function returned dict"):
        resolve_spec(model, lambda m: {})
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        resolve_spec(model, 3)  # type: ignore[arg-type]
    with pytest.raises(SpecMismatchError, match="Sequential"):
        resolve_spec(model, mlp_spec(mlp([4, 9, 3])))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="no spec for Sequential"):
        resolve_spec(conv)
    with pytest.raises(ValueError, match="Sequential has no permutation groups: nothing to do here"):
        resolve_spec(
            torch.nn.Sequential(torch.nn.Linear(4, 3)),
            example_inputs=torch.randn(2, 4),
            purpose="nothing to do here",
        )

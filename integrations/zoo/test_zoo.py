"""Zoo sweep: a smoke subset in every run, the full timm + torchvision sweep behind `-m "zoo and slow"`."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from integrations.zoo.sweep import MODELS, RTOL, SMOKE, run, summary, sweep_one  # noqa: E402

_BY_NAME = {m.name: m for m in MODELS}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_model_spec_is_verified(name):
    row = sweep_one(_BY_NAME[name])
    assert not row.error, row.error
    assert row.groups > 0
    # float64 round-off (~1e-15..1e-13), far below the tolerance that separates it from a real change
    assert row.preserved is True and row.check_error is not None and row.check_error < RTOL
    assert row.coverage > 0.8, f"coverage {row.coverage:.1%}; boundaries: {row.notes[:300]}"


def test_registry_meets_the_sweep_size():
    assert sum(m.source == "timm" for m in MODELS) >= 25
    assert sum(m.source == "torchvision" for m in MODELS) >= 15
    assert len({m.name for m in MODELS}) == len(MODELS)


@pytest.mark.zoo
@pytest.mark.slow
def test_full_sweep_targets():
    rows = run(MODELS, log=lambda line: None)
    s = summary(rows)
    assert not s["failed"], f"models that could not be traced: {s['failed']}"
    assert not s["changed_function"], f"specs that change the function: {s['changed_function']}"
    assert s["max_check_error"] < RTOL, s
    assert s["with_verified_group"] >= 0.9 * len(rows), s
    assert s["median_coverage"] >= 0.8, s


# Models whose constructs a float32 check at 1e-4 could not judge, or that once crashed the tracer.
_CONSTRUCTS = ["maxvit_tiny_tf_224", "nest_tiny", "deit3_small_patch16_224", "sequencer2d_s", "gcvit_xxtiny"]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", _CONSTRUCTS)
def test_construct_models_verified_in_float64(name):
    row = sweep_one(_BY_NAME[name])
    assert not row.error, row.error
    assert row.groups > 0 and row.preserved is True
    assert row.check_error is not None and row.check_error < RTOL, row.check_error

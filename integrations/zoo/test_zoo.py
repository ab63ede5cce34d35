"""Zoo sweep: a smoke subset in every run, the full timm + torchvision sweep behind `-m "zoo and slow"`."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from integrations.zoo.sweep import MODELS, SMOKE, run, summary, sweep_one  # noqa: E402

_BY_NAME = {m.name: m for m in MODELS}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_model_spec_is_verified(name):
    row = sweep_one(_BY_NAME[name])
    assert not row.error, row.error
    assert row.groups > 0
    assert row.preserved is True and row.check_error is not None and row.check_error < 1e-4
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
    assert not s["changed_function"], f"specs that change the function: {s['changed_function']}"
    assert s["with_verified_group"] >= 0.9 * len(rows), s
    assert s["median_coverage"] >= 0.8, s

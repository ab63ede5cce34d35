import copy

import pytest
import torch
from _align_models import cnn_spec, mlp, mlp_spec, same_state, small_cnn
from torch import nn

from rebasin_callbacks.matching import check_finite, weight_matching
from rebasin_callbacks.permute import identity_permutations, permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError


@pytest.mark.parametrize(
    "widths", [[1, 10, 10, 1], [1, 10, 10, 10, 10, 1], [1] + [10] * 8 + [1], [6, 32, 32, 3]]
)
@pytest.mark.parametrize("seed", range(4))
def test_planted_permutation_is_recovered_exactly(widths, seed):
    model = mlp(widths, normal_init=True, seed=seed)
    spec = mlp_spec(model)
    planted = random_permutations(spec, torch.Generator().manual_seed(seed))
    target = permute(model, spec, planted)
    perms = weight_matching(model, target, spec, seed=seed)
    assert all(torch.equal(perms[g], planted[g]) for g in planted)
    assert same_state(permute(model, spec, perms), target)


def test_cnn_with_batchnorm_statistics():
    model = small_cnn()
    spec = cnn_spec(model)
    target = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(1)))
    perms = weight_matching(model, target, spec)
    assert same_state(permute(model, spec, perms), target)


def test_traced_spec_when_none_is_given():
    model = small_cnn(seed=3)
    spec = cnn_spec(model)
    target = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(2)))
    perms = weight_matching(model, target, example_inputs=torch.randn(2, 3, 8, 8))
    assert len(perms) == 2
    traced = {tuple(sorted(p.tolist())) for p in perms.values()}
    assert traced == {tuple(range(8)), tuple(range(12))}


class _Concat(nn.Module):
    """Two hidden branches concatenated into one layer: an axis made of two groups' blocks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 5)
        self.out = nn.Linear(9, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def test_axis_made_of_blocks():
    torch.manual_seed(0)
    model = _Concat()
    spec = PermutationSpec.from_axes(
        {
            "a.weight": ("A", None),
            "a.bias": ("A",),
            "b.weight": ("B", None),
            "b.bias": ("B",),
            "out.weight": (None, ("A", "B")),
            "out.bias": (None,),
        },
        model.state_dict(),
    )
    planted = random_permutations(spec, torch.Generator().manual_seed(0))
    target = permute(model, spec, planted)
    x = torch.randn(7, 3)
    torch.testing.assert_close(target(x), model(x))
    # start from the identity (no greedy sweep): coordinate descent alone must use the blocks correctly
    perms = weight_matching(model, target, spec, init=identity_permutations(spec))
    assert same_state(permute(model, spec, perms), target)


def test_biases_count_in_the_similarity():
    # Weights identical up to a swap of two rows only in the biases: only biases tell the units apart.
    model = mlp([2, 4, 1], seed=0)
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(4, 2))
        model[2].weight.copy_(torch.ones(1, 4))
        model[0].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    spec = mlp_spec(model)
    planted = {"P0": torch.tensor([2, 0, 3, 1])}
    target = permute(model, spec, planted)
    assert torch.equal(weight_matching(model, target, spec)["P0"], planted["P0"])


def test_inputs_are_not_mutated():
    model = mlp([3, 8, 8, 2], seed=0)
    spec = mlp_spec(model)
    target = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(0)))
    before_m, before_t = copy.deepcopy(model), copy.deepcopy(target)
    weight_matching(model, target, spec)
    assert same_state(model, before_m) and same_state(target, before_t)


def test_state_dicts_are_accepted():
    model = mlp([3, 8, 2], seed=0)
    spec = mlp_spec(model)
    target = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(0)))
    perms = weight_matching(model.state_dict(), target.state_dict(), spec)
    assert same_state(permute(model, spec, perms), target)
    with pytest.raises(ValueError, match="spec"):
        weight_matching(model.state_dict(), target.state_dict())


def test_different_architectures_name_the_key():
    with pytest.raises(SpecMismatchError, match=r"'2.weight'.*\(2, 8\).*\(2, 9\)"):
        weight_matching(mlp([3, 8, 2]), nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(9, 2)))


def test_nan_names_the_parameter():
    model = mlp([3, 8, 2])
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"'2.bias'"):
        weight_matching(model, mlp([3, 8, 2], seed=1), mlp_spec(model))
    with pytest.raises(ValueError, match=r"'0.weight'"):
        check_finite({"0.weight": torch.tensor([1.0, float("inf")])})


def test_missing_spec_and_inputs_is_a_clear_error():
    # a convolutional stem says its channels but not the image size: nothing to trace from
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="example_inputs"):
        weight_matching(conv, copy.deepcopy(conv))


def test_a_linear_stem_is_traced_without_being_asked_and_says_so():
    a, b = mlp([3, 8, 2]), mlp([3, 8, 2], seed=1)
    with pytest.warns(
        UserWarning, match=r"random inputs of shape \(2, 3\) from the first layer's in_features"
    ):
        perms = weight_matching(a, b)
    explicit = weight_matching(a, b, mlp_spec(a))
    assert sorted(p.tolist() for p in perms.values()) == sorted(p.tolist() for p in explicit.values())


def test_timm_models_are_traced_at_their_declared_input_size():
    timm = pytest.importorskip("timm")
    from rebasin_callbacks.utils import infer_example_inputs

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x, why = infer_example_inputs(model)
    assert tuple(x.shape) == (2, *model.pretrained_cfg["input_size"]) and "pretrained_cfg" in why


def test_seed_makes_it_repeatable():
    a, b = mlp([4, 16, 16, 2], seed=0), mlp([4, 16, 16, 2], seed=1)
    spec = mlp_spec(a)
    p1 = weight_matching(a, b, spec, seed=3)
    p2 = weight_matching(a, b, spec, seed=3)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)


def _record_similarities(monkeypatch):
    """Each similarity computed after the greedy sweep: (group, the permutations it depends on)."""
    import rebasin_callbacks.matching as m

    seen = []
    original = m.MatchingProblem.similarity

    def similarity(self, g, perms, known=None):
        if known is None:
            deps = sorted({h for k, ax, _ in self.terms[g] for h in self.other_groups(k, ax)})
            seen.append((g, tuple((h, tuple(perms[h].tolist())) for h in deps)))
        return original(self, g, perms, known)

    monkeypatch.setattr(m.MatchingProblem, "similarity", similarity)
    return seen


def test_a_group_is_not_solved_again_with_the_same_neighbours(monkeypatch):
    # Random (unrelated) models: coordinate descent changes groups for several sweeps.
    widths = [8, 48, 48, 48, 48, 4]
    model, target = mlp(widths, normal_init=True, seed=0), mlp(widths, normal_init=True, seed=1)
    spec = mlp_spec(model)
    seen = _record_similarities(monkeypatch)
    perms = weight_matching(model, target, spec, seed=0)
    assert len(seen) >= len(spec.perm_to_axes)  # every group solved at least once after the greedy sweep
    assert len(seen) == len(set(seen)), "a similarity was recomputed although nothing it depends on changed"
    monkeypatch.undo()
    # What it returns is still a coordinate-wise optimum: no single group can be improved.
    again = weight_matching(model, target, spec, init=perms, seed=1)
    assert all(torch.equal(again[g], perms[g]) for g in perms)


def test_overflowing_similarity_names_the_group():
    model, target = mlp([3, 8, 2], seed=0), mlp([3, 8, 2], seed=1)
    big = {k: v * 1e20 for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="overflows"):
        weight_matching(big, {k: v * 1e20 for k, v in target.state_dict().items()}, mlp_spec(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_match_like_cpu_models():
    model = small_cnn()
    spec = cnn_spec(model)
    target = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(1)))
    cpu = weight_matching(model, target, spec, seed=0)
    cuda = weight_matching(model.cuda(), target.cuda(), spec, seed=0)
    assert all(p.device.type == "cpu" and torch.equal(p, cpu[g]) for g, p in cuda.items())


@pytest.mark.parametrize("n", [1, 2, 7, 64, 200])
def test_auction_finds_the_optimal_assignment(n):
    from scipy.optimize import linear_sum_assignment

    from rebasin_callbacks.matching import auction_assignment

    g = torch.Generator().manual_seed(n)
    for scores in (torch.randn(n, n, generator=g), torch.randint(0, 3, (n, n), generator=g).float()):
        perm = auction_assignment(scores)
        assert perm is not None and sorted(perm.tolist()) == list(range(n))
        rows, cols = linear_sum_assignment(scores.double().numpy(), maximize=True)
        best = float(scores.double().numpy()[rows, cols].sum())
        got = float(scores.double()[torch.arange(n), perm].sum())
        assert got == pytest.approx(best, abs=1e-6 * max(1.0, abs(best)))  # ties allow other optima


def test_auction_gives_up_on_a_round_cap():
    from rebasin_callbacks.matching import auction_assignment

    assert auction_assignment(torch.randn(50, 50), max_rounds=1) is None


def test_auction_solver_in_weight_matching():
    widths = [8, 48, 48, 4]
    model, target = mlp(widths, normal_init=True, seed=0), mlp(widths, normal_init=True, seed=1)
    spec = mlp_spec(model)
    exact = weight_matching(model, target, spec, seed=0, assignment_solver="scipy")
    auction = weight_matching(model, target, spec, seed=0, assignment_solver="auction")
    assert all(torch.equal(exact[g], auction[g]) for g in exact)
    planted = random_permutations(spec, torch.Generator().manual_seed(3))
    moved = permute(model, spec, planted)
    found = weight_matching(model, moved, spec, assignment_solver="auction")
    assert all(torch.equal(found[g], planted[g]) for g in planted)
    with pytest.raises(ValueError, match="assignment_solver"):
        weight_matching(model, target, spec, assignment_solver="greedy")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auction_matches_scipy_at_large_n():
    from scipy.optimize import linear_sum_assignment

    from rebasin_callbacks.matching import auction_assignment

    scores = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    perm = auction_assignment(scores.cuda())
    assert perm is not None and perm.device.type == "cuda"
    rows, cols = linear_sum_assignment(scores.double().numpy(), maximize=True)
    best = float(scores.double().numpy()[rows, cols].sum())
    assert float(scores.double()[torch.arange(2048), perm.cpu()].sum()) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("model_pair", ["mlp", "cnn"])
def test_updated_similarity_terms_equal_a_fresh_computation(monkeypatch, model_pair):
    # The cache moves a term to new permutations by adding only the changed rows' products; every
    # similarity the descent uses must equal the one computed from scratch for the same permutations.
    import rebasin_callbacks.matching as m

    if model_pair == "mlp":
        widths = [8, 64, 64, 64, 4]
        model, target = mlp(widths, normal_init=True, seed=0), mlp(widths, normal_init=True, seed=1)
        spec = mlp_spec(model)
    else:
        model, target = small_cnn(seed=0), small_cnn(seed=1)
        spec = cnn_spec(model)
    updates = []
    original_update = m.MatchingProblem._updated_term

    def updated_term(self, key, axis, blocks, deps, hit, perms):
        out = original_update(self, key, axis, blocks, deps, hit, perms)
        if out is not None and out is not hit[1]:
            updates.append(key)
        return out

    original = m.MatchingProblem.similarity
    checked = []

    def similarity(self, g, perms, known=None):
        got = original(self, g, perms, known)
        fresh = original(m.MatchingProblem(self.spec, self.a, self.b), g, perms, known)
        torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-5 * float(fresh.abs().max()))
        checked.append(g)
        return got

    monkeypatch.setattr(m.MatchingProblem, "_updated_term", updated_term)
    monkeypatch.setattr(m.MatchingProblem, "similarity", similarity)
    weight_matching(model, target, spec, seed=0)
    assert len(checked) > len(spec.perm_to_axes)
    if model_pair == "mlp":
        assert updates, "no similarity term was updated in place of a recomputation"


class _ResidualFlatten(nn.Module):
    """A residual stream (one group on both sides of an addition) and a flatten into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.body(h)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("shared", [False, True], ids=["own-problem", "shared-problem"])
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "residual_flatten"])
def test_closed_form_l2_gradient_equals_autograd(kind, shared):
    # The refinement's default step uses L2Gradient instead of autograd through the permuted weights;
    # both must give the same gradient for every group, at any hard permutations. Shared with align's
    # weight-matching problem (which also holds BatchNorm statistics), only the parameters may count.
    import rebasin_callbacks.matching as m
    from rebasin_callbacks import trace_spec
    from rebasin_callbacks.costs import L2Cost
    from rebasin_callbacks.matching import L2Gradient
    from rebasin_callbacks.permute import perm_to_matrix
    from rebasin_callbacks.rebasin import PermutedView, apply_soft_permutations

    if kind == "mlp":
        model, ref = mlp([5, 16, 16, 3], seed=0), mlp([5, 16, 16, 3], seed=1)
        spec = mlp_spec(model)
    elif kind == "cnn_bn":
        model, ref = small_cnn(seed=0), small_cnn(seed=1)
        spec = cnn_spec(model)
    else:
        torch.manual_seed(0)
        model, ref = _ResidualFlatten(), _ResidualFlatten()
        spec = trace_spec(model, torch.randn(2, 3, 4, 4))
        assert any(k > 1 for g, _, k in _flatten_blocks(spec)), "the spec should have a flattened block"
    problem = m.MatchingProblem.from_states(spec, model.state_dict(), ref.state_dict()) if shared else None
    closed = L2Gradient(model, ref, spec, problem=problem)
    assert (closed.problem is problem) == shared
    gen = torch.Generator().manual_seed(0)
    perms = random_permutations(spec, gen)
    for trial in range(3):
        if trial == 2:  # a few units moved: the cached similarity terms are updated, not recomputed
            g0 = next(iter(perms))
            p = perms[g0].clone()
            p[[0, 1]] = p[[1, 0]]
            perms = {**perms, g0: p}
        mats = {g: perm_to_matrix(p, torch.float32).requires_grad_() for g, p in perms.items()}
        state = {k: v.detach() for k, v in model.state_dict().items()}
        L2Cost()(PermutedView(model, apply_soft_permutations(state, spec, mats)), ref).backward()
        got = closed(perms)
        for g, M in mats.items():
            expected = M.grad if M.grad is not None else torch.zeros_like(M)
            torch.testing.assert_close(got.get(g, torch.zeros_like(M)), expected, rtol=1e-4, atol=1e-7)
        if trial == 0:
            perms = random_permutations(spec, gen)


def _flatten_blocks(spec):
    """(group, axis size, entries per unit) of every block of every axis."""
    out = []
    for key, axes in spec.axes_to_perm.items():
        for axis in range(len(axes)):
            for g, start, stop in spec.axis_blocks(key, axis):
                if g is not None:
                    out.append((g, stop - start, (stop - start) // spec.sizes[g]))
    return out

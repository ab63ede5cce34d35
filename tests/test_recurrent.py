"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): one permutation of hidden units per layer and
direction, acting alike on every gate block, on the recurrence's own input (``weight_hh``'s columns) and on
whatever reads the output. The tracer, ``permute``, ``check_spec`` (float64), the soft application used by
``ReBasin`` and weight matching must all agree on it, and a wrong spec must still be caught."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import perm_to_matrix, permute, permute_state_dict, random_permutations
from rebasin_callbacks.rebasin import PermutedView, ReBasin, apply_soft_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import SpecCheckError, check_spec, trace_spec


class RowClassifier(nn.Module):
    """The rows of a 28x28 image as a sequence of 28 steps -> recurrent layer -> Linear on the last step."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, hidden: int = 64, **kwargs) -> None:
        super().__init__()
        self.batch_first = kwargs.setdefault("batch_first", True)
        self.rnn = cell(28, hidden, **kwargs)
        width = (kwargs.get("proj_size") or hidden) * (2 if kwargs.get("bidirectional") else 1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(0, 1)  # (B, 1, 28, 28) -> (B, 28, 28)
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


class StateReader(nn.Module):
    """A Linear feeds the recurrent layer; the classifier reads the final state ``h_n`` (and the output)."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(28, 16)
        self.rnn = cell(16, 12, batch_first=True, **kwargs)
        width = kwargs.get("proj_size") or 12
        self.fc = nn.Linear(width, 10)
        self.lstm = cell is nn.LSTM  # decided here: under torch.fx the state is a proxy, not a tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(torch.relu(self.embed(x.flatten(0, 1))))
        h = state[0] if self.lstm else state
        return self.fc(h[-1]) + out.mean(dim=(1, 2)).unsqueeze(1)


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationSpec:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = trace_spec(model, x)
    dropped = [str(w.message) for w in caught if "changed the outputs" in str(w.message)]
    assert not dropped, dropped  # every traced group keeps the function
    return spec


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_gate_blocks_share_the_hidden_permutation(cell, gates):
    torch.manual_seed(0)
    model = RowClassifier(cell, hidden=16)
    spec = _trace(model, _images())
    rows = ("P_rnn.h0",) * gates
    assert spec.axes_to_perm["rnn.weight_ih_l0"] == (rows, None)  # the image's columns stay fixed
    assert spec.axes_to_perm["rnn.weight_hh_l0"] == (rows, "P_rnn.h0")
    assert spec.axes_to_perm["rnn.bias_ih_l0"] == spec.axes_to_perm["rnn.bias_hh_l0"] == (rows,)
    assert spec.axes_to_perm["fc.weight"] == (None, "P_rnn.h0")
    assert spec.sizes == {"P_rnn.h0": 16}
    assert spec.check_error is not None and spec.check_error < 1e-12


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_planted_permutation_is_recovered_exactly(cell):
    torch.manual_seed(1)
    model = RowClassifier(cell, hidden=64).eval()
    x = _images(8)
    spec = _trace(model, x)
    planted = random_permutations(spec, seed=3)
    shuffled = permute(model, spec, planted)
    torch.testing.assert_close(shuffled(x), model(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(shuffled.rnn.weight_hh_l0, model.rnn.weight_hh_l0)
    perms = weight_matching(shuffled, model, spec)
    restored = permute(shuffled, spec, perms)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize(
    "cell,kwargs",
    [
        (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
        (nn.GRU, {"num_layers": 3, "bias": False, "batch_first": False}),
        (nn.RNN, {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"}),
        (nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 5, "batch_first": False}),
    ],
)
def test_stacked_and_bidirectional_layers_are_traced_and_verified(cell, kwargs):
    torch.manual_seed(2)
    model = RowClassifier(cell, hidden=12, **kwargs)
    x = _images(3)
    spec = _trace(model, x)
    directions = ("", "_reverse") if kwargs.get("bidirectional") else ("",)
    expected = {f"P_rnn.h{k}{d}" for k in range(kwargs["num_layers"]) for d in directions}
    if kwargs.get("proj_size"):
        expected |= {f"P_rnn.proj{k}{d}" for k in range(kwargs["num_layers"]) for d in directions}
    assert set(spec.groups) == expected
    rnn_keys = [k for k in model.state_dict() if k.startswith("rnn.")]
    assert all(spec.axes_to_perm[k][0] is not None for k in rnn_keys)  # every weight's rows move
    if kwargs.get("bidirectional"):
        # the next layer reads [forward, backward]: one block per direction
        out = "P_rnn.proj0" if kwargs.get("proj_size") else "P_rnn.h0"
        assert spec.axes_to_perm["rnn.weight_ih_l1"][1] == (out, f"{out}_reverse")
    if kwargs.get("proj_size"):
        assert spec.axes_to_perm["rnn.weight_hr_l0"] == ("P_rnn.proj0", "P_rnn.h0")
        assert spec.axes_to_perm["rnn.weight_hh_l0"] == (("P_rnn.h0",) * 4, "P_rnn.proj0")
    assert PermutationSpec.from_json(spec.to_json()) == spec  # the gate blocks survive a JSON round trip
    # a fresh check with other random permutations, every group at once and each on its own
    assert check_spec(model, spec, x, seed=11) < 1e-12
    for group in spec.groups:
        assert check_spec(model, spec, x, seed=5, groups=[group]) < 1e-12


@pytest.mark.parametrize(
    "cell,kwargs", [(nn.LSTM, {}), (nn.GRU, {"num_layers": 2}), (nn.LSTM, {"proj_size": 5})]
)
def test_a_read_final_state_joins_every_layer_and_the_producer_crosses_in(cell, kwargs):
    torch.manual_seed(3)
    model = StateReader(cell, **kwargs)
    x = _images(3)
    spec = _trace(model, x)
    # the Linear feeding the layer shares its output permutation with the layer's input columns
    assert spec.axes_to_perm["embed.weight"][0] == spec.axes_to_perm["rnn.weight_ih_l0"][1] is not None
    if kwargs.get("num_layers"):  # h_n stacks both layers on one axis: one permutation for both
        assert spec.axes_to_perm["rnn.weight_hh_l0"][1] == spec.axes_to_perm["rnn.weight_hh_l1"][1]
    assert check_spec(model, spec, x, seed=4) < 1e-12


def test_an_initial_state_from_the_input_fixes_the_hidden_units():
    class GivenState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(28, 8, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x.flatten(0, 1), h0)
            return self.fc(out[:, -1])

    model = GivenState()
    with pytest.warns(UserWarning, match="initial state"):
        spec = trace_spec(model, (_images(2), torch.randn(1, 2, 8)))
    assert len(spec) == 0  # the caller's h0 is in the model's fixed input basis


def test_packed_sequences_are_a_boundary():
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(28, 8, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq = x.flatten(0, 1)
            lengths = torch.full((seq.shape[0],), seq.shape[1], dtype=torch.long)
            packed = nn.utils.rnn.pack_padded_sequence(seq, lengths, batch_first=True)
            _, (h, _) = self.rnn(packed)
            return self.fc(h[-1])

    model = Packed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            spec = trace_spec(model, _images(2))
        except Exception as err:  # noqa: BLE001 - an untraceable model is also a refusal, never a wrong spec
            assert "trace" in str(err)
            return
    assert not any(
        k.startswith("rnn.") and any(a is not None for a in v) for k, v in spec.axes_to_perm.items()
    )


def test_a_wrong_recurrent_spec_is_caught():
    torch.manual_seed(4)
    model = RowClassifier(nn.LSTM, hidden=8)
    x = _images(2)
    spec = _trace(model, x)
    # forgetting the recurrence's own input (weight_hh's columns) changes the function
    axes = dict(spec.axes_to_perm)
    axes["rnn.weight_hh_l0"] = (axes["rnn.weight_hh_l0"][0], None)
    wrong = PermutationSpec.from_axes(axes, model.state_dict())
    with pytest.raises(SpecCheckError) as err:
        check_spec(model, wrong, x)
    assert "P_rnn.h0" in err.value.failing
    # and one permutation on a single gate block (the others left in place) does too
    axes = dict(spec.axes_to_perm)
    for key in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        axes[key] = (("P_rnn.h0", 8, 8, 8), *axes[key][1:])
    wrong = PermutationSpec.from_axes(axes, model.state_dict())
    with pytest.raises(SpecCheckError):
        check_spec(model, wrong, x)


def test_soft_application_with_hard_matrices_equals_permute():
    torch.manual_seed(5)
    model = RowClassifier(nn.GRU, hidden=10, num_layers=2, bidirectional=True)
    spec = _trace(model, _images(2))
    perms = random_permutations(spec, seed=6)
    state = {k: v.double() for k, v in model.state_dict().items()}
    hard = permute_state_dict(state, spec, perms)
    soft = apply_soft_permutations(
        state, spec, {g: perm_to_matrix(p, torch.float64) for g, p in perms.items()}
    )
    for key in state:
        torch.testing.assert_close(soft[key], hard[key], atol=1e-12, rtol=0)


def test_rebasin_view_runs_the_recurrent_model_with_the_given_weights():
    torch.manual_seed(6)
    model = RowClassifier(nn.LSTM, hidden=8).eval()
    x = _images(4)
    spec = _trace(model, x)
    perms = random_permutations(spec, seed=7)
    # the LSTM's weights moved but not the classifier's: a different function, which the view must compute
    matrices = {g: perm_to_matrix(p) for g, p in perms.items()}
    state = apply_soft_permutations(model.state_dict(), spec, matrices)
    state = {k: (v if k.startswith("rnn.") else model.state_dict()[k]) for k, v in state.items()}
    loaded = RowClassifier(nn.LSTM, hidden=8).eval()
    loaded.load_state_dict(state)
    view = PermutedView(model, state)
    assert not torch.allclose(loaded(x), model(x), atol=1e-3)
    torch.testing.assert_close(view(x), loaded(x), atol=1e-6, rtol=1e-6)
    # and the relaxation's gradient reaches every score through the recurrence
    shuffled = permute(model, spec, perms)
    rb = ReBasin(shuffled, spec, init="identity", init_scale=20.0)
    loss = ((rb()(x) - model(x)) ** 2).sum() + sum(
        ((rb().state[k] - v) ** 2).sum() for k, v in model.state_dict().items() if k.startswith("rnn.")
    )
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in rb.scores.values())


def test_timm_sequencer_lstms_are_permuted_and_verified():
    timm = pytest.importorskip("timm")
    from timm.models.sequencer import Sequencer2d

    torch.manual_seed(7)
    model = Sequencer2d(
        num_classes=10, img_size=32, layers=(1, 1, 1, 1), patch_sizes=(4, 2, 2, 1),
        embed_dims=(16, 24, 24, 24), hidden_sizes=(8, 12, 12, 12), mlp_ratios=(2.0,) * 4,
    ).eval()  # fmt: skip
    assert timm is not None
    x = torch.randn(2, 3, 32, 32)
    spec = _trace(model, x)
    lstm_keys = [k for k in model.state_dict() if ".rnn_v." in k or ".rnn_h." in k]
    assert len(lstm_keys) == 4 * 2 * 2 * 4  # 4 blocks, LSTMs along columns and rows, 2 directions, 4 tensors
    assert all(spec.axes_to_perm[k][0] is not None for k in lstm_keys)
    assert spec.coverage(model.state_dict()) > 0.99  # all but the classifier bias
    assert check_spec(model, spec, x, seed=8) < 1e-12


def test_quality_benchmark_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_recurrent.py"
    module_spec = importlib.util.spec_from_file_location("quality_recurrent", path)
    assert module_spec is not None and module_spec.loader is not None
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    out = tmp_path / "recurrent.md"
    rows = bench.main(["--smoke", "--out", str(out)])
    assert [r["method"] for r in rows] == ["naive", "wm", "align"]
    assert all(r["loss_barrier"] == r["loss_barrier"] and r["seconds"] >= 0 for r in rows)
    _, wm, aligned = (r["l2"] for r in rows)
    assert aligned <= wm * (1 + 1e-6)  # align never ends farther than its warm start
    assert "| wm |" in out.read_text()


class ZeroState(nn.Module):
    """The tutorials' pattern: a zero initial state built in ``forward`` (optionally written to after)."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM, write: bool = False) -> None:
        super().__init__()
        self.rnn = cell(28, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 10)
        self.lstm, self.write = cell is nn.LSTM, write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(0, 1)
        h0 = seq.new_zeros(2, seq.size(0), 16)
        if self.write:
            h0.add_(seq[:, 0, :16].unsqueeze(0))  # no longer zero: the state is in the input's basis
        out, _ = self.rnn(seq, (h0, torch.zeros_like(h0)) if self.lstm else h0)
        return self.fc(out[:, -1, :])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_a_zero_initial_state_constrains_nothing(cell):
    torch.manual_seed(8)
    model, x = ZeroState(cell), _images(3)
    spec = _trace(model, x)
    assert set(spec.groups) == {"P_rnn.h0", "P_rnn.h1"}  # the layers keep their own permutations
    assert check_spec(model, spec, x, seed=9) < 1e-12


def test_a_state_written_in_place_is_not_taken_for_zeros():
    model = ZeroState(nn.GRU, write=True)
    with pytest.warns(UserWarning, match="initial state in a fixed basis"):
        spec = trace_spec(model, _images(2))
    assert len(spec) == 0


class CellLoop(nn.Module):
    """A recurrent cell unrolled over the 28 rows, its state fed back each step."""

    def __init__(self, cell: type[nn.RNNCellBase]) -> None:
        super().__init__()
        self.embed = nn.Linear(28, 20)
        self.cell = cell(20, 16)
        self.fc = nn.Linear(16, 10)
        self.lstm = cell is nn.LSTMCell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = torch.tanh(self.embed(x.flatten(0, 1)))
        state = None
        for t in range(28):
            state = self.cell(seq[:, t], state)
        return self.fc(state[0] if self.lstm else state)


@pytest.mark.parametrize("cell,gates", [(nn.LSTMCell, 4), (nn.GRUCell, 3), (nn.RNNCell, 1)])
def test_recurrent_cells_in_a_loop_share_one_group_and_are_recovered(cell, gates):
    torch.manual_seed(9)
    model, x = CellLoop(cell).eval(), _images(4)
    spec = _trace(model, x)
    rows = ("P_cell",) * gates
    assert spec.axes_to_perm["cell.weight_hh"] == (rows, "P_cell")
    assert spec.axes_to_perm["cell.weight_ih"] == (rows, "P_embed")  # the Linear crosses into the cell
    shuffled = permute(model, spec, random_permutations(spec, seed=10))
    restored = permute(shuffled, spec, weight_matching(shuffled, model, spec))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_lstm_is_traced_permuted_and_matched_on_its_device():
    torch.manual_seed(11)
    model = RowClassifier(nn.LSTM, hidden=32, num_layers=2, bidirectional=True).cuda().eval()
    x = _images(8).cuda()
    spec = _trace(model, x)
    assert len(spec) == 4
    shuffled = permute(model, spec, random_permutations(spec, seed=12))
    assert shuffled.rnn.weight_hh_l0.is_cuda
    # cuDNN may compute in TF32: compare at that precision
    torch.testing.assert_close(shuffled(x), model(x), atol=1e-3, rtol=1e-3)
    restored = permute(shuffled, spec, weight_matching(shuffled, model, spec))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    view = ReBasin(shuffled, spec)()
    assert view(x).device == x.device

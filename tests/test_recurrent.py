"""nn.LSTM / nn.GRU / nn.RNN: one permutation of hidden units per layer and direction, on every gate block."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import check_spec, trace_spec
from rebasin_callbacks.utils import l2_distance


class _RowClassifier(nn.Module):
    """Rows of an image as a sequence, classified from the last step's output."""

    def __init__(self, cell: type = nn.LSTM, **kwargs) -> None:
        super().__init__()
        self.rnn = cell(12, 16, batch_first=True, **kwargs)
        self.fc = nn.Linear(16 * (2 if kwargs.get("bidirectional") else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class _FinalState(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(12, 16, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        return self.fc(h[-1])


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_spec(model, x)


@pytest.mark.parametrize(
    "model",
    [
        _RowClassifier(nn.LSTM),
        _RowClassifier(nn.GRU, num_layers=2, bidirectional=True),
        _RowClassifier(nn.RNN),
        _FinalState(1),
    ],
    ids=["lstm", "gru-2-layers-bidirectional", "rnn", "gru-final-state"],
)
def test_hidden_units_permuted_on_every_gate(model: nn.Module):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(3, 7, 12)
    spec = _trace(model, x)
    layers, dirs = model.rnn.num_layers, 2 if model.rnn.bidirectional else 1
    assert len(spec) == layers * dirs
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(model.rnn)]
    assert spec.axes_to_perm["rnn.weight_ih_l0"][0] == ("P_rnn.h0",) * gates
    assert spec.axes_to_perm["rnn.weight_hh_l0"][1] == "P_rnn.h0"
    assert spec.check_error is not None and spec.check_error < 1e-12
    planted = permute(model, spec, random_permutations(spec, 1))
    torch.testing.assert_close(planted(x), model(x), atol=1e-5, rtol=1e-5)
    found = weight_matching(planted, model, spec)
    assert l2_distance(permute(planted, spec, found), model) < 1e-5


def test_final_states_of_several_layers_are_a_boundary():
    torch.manual_seed(0)
    model, x = _FinalState(2).eval(), torch.randn(3, 7, 12)
    with pytest.warns(UserWarning, match="final states of several layers"):
        spec = trace_spec(model, x)
    assert len(spec) == 0
    assert check_spec(model, spec, x) == 0.0

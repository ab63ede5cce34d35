"""Checkpoint files the library reads (callbacks' ``reference=``, ``load_reference_state``): a file that is not a
state dict is refused with one plain line saying what it is, never torch's raw unpickling text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rebasin_callbacks.checkpoints import describe_unreadable, load_reference_state


def test_a_whole_pickled_model_is_named_with_what_to_save_instead(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Linear(3, 2), path)  # the whole module, not its state dict
    with pytest.raises(ValueError) as info:
        load_reference_state(path)
    message = str(info.value)
    assert "whole pickled model (torch.nn.modules.linear.Linear)" in message
    assert "torch.save(model.state_dict()" in message
    assert (
        "\x1b[" not in message and "weights_only=False" not in message and "add_safe_globals" not in message
    )
    assert "\n" not in message


def test_another_pickled_object_is_not_called_a_model(tmp_path):
    text = describe_unreadable(
        "x.pt", "\x1b[1mUnsupported global: GLOBAL collections.OrderedDict2 was not an allowed"
    )
    assert text.startswith("x.pt is a pickled object (collections.OrderedDict2)")
    assert "\x1b[" not in text


def test_a_file_that_is_no_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt is not a readable torch checkpoint"):
        load_reference_state(path)

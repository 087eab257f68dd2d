"""dgc_pyro.checkpoint.check_run_config: the run configuration saved beside a model, checked entry by entry."""

from __future__ import annotations

import pytest

from dgc_pyro.checkpoint import check_run_config
from dgc_pyro.io import CheckpointError


def test_a_good_run_configuration_is_returned_as_it_is():
    config = {
        "dataset": "digits",
        "seed": 3,
        "counts": [5, 4],
        "train_counts": [5, 4],
        "recipe": {"epochs": 2},
        "baseline": None,
        "anything": "else",
    }
    assert check_run_config(config, "m.safetensors") is config
    assert check_run_config({}, "m.safetensors") == {}  # every entry is optional unless required


@pytest.mark.parametrize(
    "config, required, message",
    [
        ([1, 2], (), "m.safetensors: its run configuration is unusable (a list, not a mapping)"),
        (
            {"counts": 5},
            (),
            "m.safetensors: its run configuration is unusable (counts must be a list of integers, got 5)",
        ),
        ({"seed": -1}, (), "m.safetensors: its run configuration is unusable (seed must be an integer >= 0, got -1)"),
        (
            {"seed": True},
            (),
            "m.safetensors: its run configuration is unusable (seed must be an integer >= 0, got True)",
        ),
        (
            {"recipe": "elbo"},
            (),
            "m.safetensors: its run configuration is unusable (recipe must be a mapping, got 'elbo')",
        ),
        (
            {"dataset": "digits"},
            ("dataset", "seed"),
            "m.safetensors: its run configuration is unusable (seed is missing)",
        ),
    ],
)
def test_a_damaged_run_configuration_is_refused_naming_the_entry(config, required, message):
    with pytest.raises(CheckpointError) as info:
        check_run_config(config, "m.safetensors", required=required)
    assert str(info.value) == message

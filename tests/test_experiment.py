"""dgc_pyro.experiment.train: the one training sequence (seed, build the recipe's model, fit it) of the CLI, the
sampler and the benchmarks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import Trained, default_recipe, run_experiment, train
from dgc_pyro.inference import fit
from dgc_pyro.reproducibility import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    split = load_imbalanced("digits", counts=(12, 8, 6, 5, 5, 5, 5, 5, 5, 5), seed=3)
    return split, dataclasses.replace(default_recipe("digits"), epochs=2, latent_dim=4)


def _losses(history):
    return [r["loss"] for r in history.epochs]


def test_train_is_the_sequence_it_replaces(small):
    """The numbers of ``seed_everything -> recipe.build_model -> fit(**recipe.fit_options())``, which the CLI and
    the benchmarks wrote out before train existed, for the same seed."""
    split, recipe = small
    seed_everything(5)
    model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
    history = fit(model, split.x_train, split.y_train, **recipe.fit_options(), device="cpu", seed=5, progress=False)
    trained = train(recipe, split, 5, device="cpu", progress=False)
    assert isinstance(trained, Trained) and trained.recipe is recipe and trained.seed == 5 and trained.seconds > 0
    assert _losses(trained.history) == _losses(history) and trained.history.best_epoch == history.best_epoch
    for (name, a), b in zip(model.state_dict().items(), trained.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert _losses(train(recipe, split, 6, device="cpu", progress=False).history) != _losses(history)


def test_run_experiment_trains_with_train(small):
    split, recipe = small
    trained = train(recipe, split, 2, device="cpu", progress=False)
    result = run_experiment(split, recipe, seed=2, device="cpu", baseline=None, progress=False)
    assert _losses(result.history) == _losses(trained.history)


def test_train_passes_fit_options_and_hands_over_the_model(small):
    split, recipe = small
    built, epochs = [], []
    trained = train(
        recipe,
        split,
        0,
        device="cpu",
        progress=False,
        val_num_samples=2,
        on_build=built.append,
        callback=lambda epoch, record: epochs.append(epoch),
        engine="torch",
    )
    assert built == [trained.model] and epochs == [1, 2] and trained.history.config["engine"] == "torch"


def test_train_refuses_a_fit_option_the_recipe_sets(small):
    split, recipe = small
    with pytest.raises(
        ValueError,
        match=r"^train: epochs is set by the recipe; pass "
        r"dataclasses\.replace\(recipe, epochs=\.\.\.\) instead$",
    ):
        train(recipe, split, 0, epochs=3)

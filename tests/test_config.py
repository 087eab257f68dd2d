"""The configuration (issue 20, item 1): one field per option, and everything else generated from the fields."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from dgc_pyro import cli
from dgc_pyro.checkpoint import load_training_state
from dgc_pyro.config import (
    FIXED,
    FREE,
    ModelConfig,
    Recipe,
    TrainConfig,
    config_fields,
    parse_overrides,
    resume_differences,
    resume_settings,
)
from dgc_pyro.inference import fit
from dgc_pyro.inference.callbacks import Checkpointing
from dgc_pyro.models import DGC

FIT_KW = dict(batch_size=64, val_fraction=0.2, val_num_samples=2, progress=False, device="cpu", seed=0)


def _fit_parser():
    return cli._options_of(cli.build_parser(), "fit")


def test_every_field_has_its_facts():
    for f in config_fields():
        meta = f.metadata
        assert meta["help"] and meta["resume"] in (FIXED, FREE) and meta["role"] in ("recipe", "run"), f.name
        assert meta["role"] == "recipe" or meta["resume"] == FREE, f"{f.name}: how a run executes is free on resume"


def test_every_field_is_a_fit_flag_with_its_resume_mark():
    by_dest = {a.dest: a for a in _fit_parser()._actions if getattr(a, "config_field", None) is not None}
    for f in config_fields():
        action = by_dest[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.resume == f.metadata["resume"] and f.metadata["help"] in action.help
    assert set(by_dest) == {f.name for f in config_fields()}


def test_the_old_flag_spellings_still_set_the_fields():
    parse = cli.build_parser().parse_args
    args = parse(["fit", "--keep", "last", "--guide", "x", "--num-samples", "3", "--transform", "none"])
    assert args.select_best is False and args.label_in_guide is False and args.val_num_samples == 3
    recipe = cli._recipe_from_flags(args, "digits")
    assert recipe.select_best is False and recipe.label_in_guide is False and recipe.num_samples == 3
    assert recipe.transform is None
    args = parse(["fit", "--no-select-best", "--label-in-guide", "--betas", "0.5,0.9", "--warmup-steps", "none"])
    recipe = cli._recipe_from_flags(args, "digits")
    assert recipe.select_best is False and recipe.label_in_guide is True and recipe.betas == (0.5, 0.9)
    assert recipe.warmup_steps is None


def test_every_field_is_a_recipe_override_and_in_the_recipe_json():
    recipe = Recipe()
    flat = recipe.to_dict()
    assert set(flat) == {f.name for f in config_fields()}
    assert Recipe.from_flat(json.loads(json.dumps(flat))) == recipe  # JSON round trip (betas come back a list)
    for f in config_fields():
        if f.name in ("objective", "compile"):  # a name of a registry / True: covered below
            continue
        text = {bool: "false", tuple: "0.5,0.9"}.get(type(f.default), "none" if f.default is None else str(f.default))
        assert f.name in parse_overrides([f"{f.name}={text}"])
    assert parse_overrides(["num_samples=4"]) == {"val_num_samples": 4}  # the old name


def test_resume_check_refuses_every_changed_fixed_field_and_accepts_every_free_one():
    base = TrainConfig(epochs=4, engine="torch")  # a fit records the engine it resolved
    saved = resume_settings(base, seed=0, explicit_val=False)
    changed = {
        "objective": "elbo-analytic",
        "epochs": 6,
        "batch_size": 7,
        "lr": 0.5,
        "betas": (0.5, 0.9),
        "classifier_lr": 0.2,
        "lr_schedule": "cosine",
        "warmup_steps": 3,
        "val_fraction": 0.3,
        "val_num_samples": 3,
        "select_best": False,
        "perturbation_rate": 0.1,
        "perturbation_prior": "perturbed",
        "perturbation_start": 0.5,
        "perturbation_noise": "head",
        "retrain_head_epochs": 1,
        "swag_start": 0.5,
        "swag_rank": 3,
        "swag_every_steps": 2,
        "swag_samples": 4,
        "pretrain_steps": 5,
        "transform": "shift",
        "engine": "graph",
        "check_every": 3,
        "deterministic": True,
        "compile": True,
        "devices": 2,
        "strategy": "ddp",
    }
    assert set(changed) == {f.name for f in config_fields(TrainConfig)}  # a new field must be added here
    for name, value in changed.items():
        options = {name: value}
        if name in ("perturbation_noise", "retrain_head_epochs"):
            options["devices"] = 1
        if name in ("devices", "strategy"):
            options["perturbation_noise"] = "own"
        if name == "swag_every_steps":  # it needs a window
            options["swag_start"] = 0.5
        now = resume_settings(base.replace(**options), seed=0, explicit_val=False)
        diffs = resume_differences(saved, now)
        field = next(f for f in config_fields(TrainConfig) if f.name == name)
        if field.metadata["resume"] == FIXED:
            assert any(d.startswith(f"{name}=") for d in diffs), name
        else:
            assert not any(d.startswith(f"{name}=") for d in diffs), (name, diffs)
    # graph and torch run the same step; svi does not
    torch_now = resume_settings(base.replace(engine="torch"), seed=0, explicit_val=False)
    assert resume_differences({**saved, "engine": "graph"}, torch_now) == []
    assert resume_differences({**saved, "engine": "svi"}, torch_now) == ["engine='svi' in the checkpoint, 'torch' now"]


def test_a_checkpoint_without_a_newer_option_had_its_absent_value():
    saved = resume_settings(TrainConfig(warmup_steps=0), seed=0, explicit_val=False)
    del saved["warmup_steps"], saved["perturbation_noise"]  # as written before the options existed
    assert resume_differences(saved, resume_settings(TrainConfig(warmup_steps=0), seed=0, explicit_val=False)) == []
    assert resume_differences(saved, resume_settings(TrainConfig(warmup_steps=5), seed=0, explicit_val=False)) == [
        "warmup_steps=0 in the checkpoint, 5 now"
    ]


def test_fit_records_every_option_in_history_and_checkpoint(digits, tmp_path):
    model = DGC(digits.input_shape, 10, latent_dim=4)
    history = fit(
        model,
        digits.x_train,
        digits.y_train,
        TrainConfig(epochs=1, check_every=5),
        callbacks=[Checkpointing(tmp_path, metadata={"run": {"note": 1}})],
        **FIT_KW,
    )
    names = {f.name for f in config_fields(TrainConfig)}
    assert names <= set(history.config) and history.config["check_every"] == 5
    state = load_training_state(tmp_path)
    assert names <= set(state.config) and state.extra == {"run": {"note": 1}}
    assert history.config["classifier_lr"] == history.config["lr"]  # resolved, as the checkpoint records it


def test_fit_takes_a_config_and_its_fields_as_keywords(digits):
    assert len(inspect.signature(fit).parameters) - 1 <= 12  # named parameters, beside **options
    make = lambda: DGC(digits.input_shape, 10, latent_dim=4)
    torch.manual_seed(0)
    a = fit(make(), digits.x_train, digits.y_train, TrainConfig(epochs=1, lr=2e-3), engine="torch", **FIT_KW)
    torch.manual_seed(0)
    b = fit(make(), digits.x_train, digits.y_train, epochs=1, lr=2e-3, engine="torch", **FIT_KW)
    assert a.epochs == b.epochs and a.config == b.config
    with pytest.raises(TypeError, match=r"^unknown fit option 'lr_shedule'; did you mean lr_schedule\?$"):
        fit(make(), digits.x_train, digits.y_train, lr_shedule="cosine")
    with pytest.raises(TypeError, match="config must be a dgc_pyro.config.TrainConfig"):
        fit(make(), digits.x_train, digits.y_train, {"epochs": 1})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(lr=-1), "lr must be positive and finite, got -1"),
        (lambda: TrainConfig(engine="jax"), "engine must be one of ('torch', 'graph', 'svi'), got 'jax'"),
        (lambda: TrainConfig(epochs=2, retrain_head_epochs=2), "retrain_head_epochs=2 leaves no epoch"),
        (lambda: TrainConfig(devices=0), "devices must be a positive integer, got 0"),
        (lambda: ModelConfig(latent_dim=0), "latent_dim must be a positive integer, got 0"),
        (lambda: ModelConfig(preset="huge"), "preset must be one of"),
        (lambda: Recipe(epoch=3), "unknown recipe field 'epoch'; did you mean epochs?"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(make, message):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_recipe_pairs_the_two_configs_and_reads_flat():
    recipe = Recipe(epochs=60, latent_dim=16, num_samples=3)
    assert recipe == Recipe(model=ModelConfig(latent_dim=16), train=TrainConfig(epochs=60, val_num_samples=3))
    assert (recipe.epochs, recipe.latent_dim, recipe.num_samples) == (60, 16, 3)
    assert dataclasses.replace(recipe, lr=3e-4).train.lr == 3e-4 == recipe.replace(lr=3e-4).lr
    assert Recipe().epochs == 30 and TrainConfig().epochs == 20  # the runs' recipe and fit's own default
    assert set(recipe.fit_options()) == {f.name for f in config_fields(TrainConfig, role="recipe")}


def test_a_run_configuration_recipe_is_checked_by_its_fields():
    from dgc_pyro.checkpoint import check_run_config
    from dgc_pyro.io import CheckpointError

    assert check_run_config({"recipe": {"num_samples": 3, "betas": [0.5, 0.9]}}, "m")  # older names, JSON lists
    with pytest.raises(
        CheckpointError,
        match=r"^m: its run configuration is unusable \(recipe: unknown recipe field "
        r"'epoch'; did you mean epochs\?\)$",
    ):
        check_run_config({"recipe": {"epoch": 3}}, "m")

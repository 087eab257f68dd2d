"""User callbacks of the training loop (issue 20): ``fit(..., callbacks=(...))`` hooks into every epoch.

Tiny models on sklearn's digits; the tests check the mechanics (which hooks run, when the loop stops, what a
checkpoint holds), not accuracy.
"""

from __future__ import annotations

import pytest
import torch

from dgc_pyro.checkpoint import TRAINING_STATE_FILE, load_training_state
from dgc_pyro.inference import fit
from dgc_pyro.inference.callbacks import Callback, EarlyStopping
from dgc_pyro.models.dgc import DGC

FIT_KW = dict(batch_size=64, progress=False, val_num_samples=2, device="cpu", lr=3e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(digits) -> DGC:
    torch.manual_seed(0)
    return DGC(digits.input_shape, digits.num_classes, latent_dim=4)


class Recorder(Callback):
    """A logging callback: keeps every epoch record and the order of the hooks it saw."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.hooks: list[str] = []

    def on_fit_start(self, trainer, start_epoch):
        self.hooks.append(f"start:{start_epoch}")

    def on_epoch_end(self, trainer, epoch, record):
        self.records.append(dict(record))

    def on_state(self, trainer, state):
        self.hooks.append(f"state:{state.epoch}")

    def on_fit_end(self, trainer):
        self.hooks.append("end")


class StopAfter:
    """A duck-typed callback (no base class, one hook) that stops the fit after epoch ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer, epoch, record):
        if epoch >= self.n:
            trainer.should_stop = True


def test_a_logging_callback_sees_every_epoch_record(digits):
    log = Recorder()
    history = fit(_model(digits), digits.x_train, digits.y_train, epochs=3, callbacks=[log], **FIT_KW)
    assert log.records == history.epochs
    assert [r["epoch"] for r in log.records] == [1, 2, 3] and all("val_acsa" in r for r in log.records)
    assert log.hooks == ["start:0", "state:1", "state:2", "state:3", "end"]


def test_a_stopping_callback_ends_the_fit_and_checkpoints_where_it_stopped(digits, tmp_path):
    history = fit(
        _model(digits),
        digits.x_train,
        digits.y_train,
        epochs=6,
        callbacks=(StopAfter(2),),
        checkpoint_dir=tmp_path,
        select_best=False,
        **FIT_KW,
    )
    assert [r["epoch"] for r in history.epochs] == [1, 2]
    assert history.best_epoch == 2
    assert load_training_state(tmp_path / TRAINING_STATE_FILE).epoch == 2


def test_early_stopping_stops_when_the_monitored_value_stops_improving(digits):
    # nothing beats a best of +inf: patience 2 stops after epoch 2 whatever the fit does
    stop = EarlyStopping(monitor="loss", mode="min", patience=2)
    stop.best = float("inf")
    history = fit(_model(digits), digits.x_train, digits.y_train, epochs=8, callbacks=[stop], **FIT_KW)
    assert len(history.epochs) == 2


def test_early_stopping_on_a_missing_key_names_it(digits):
    with pytest.raises(KeyError, match="val_acsa"):
        fit(
            _model(digits),
            digits.x_train,
            digits.y_train,
            epochs=1,
            val_fraction=0.0,
            callbacks=[EarlyStopping()],
            **FIT_KW,
        )


def test_callbacks_must_be_a_sequence(digits):
    with pytest.raises(ValueError, match="callbacks must be a list or tuple"):
        fit(_model(digits), digits.x_train, digits.y_train, epochs=1, callbacks=Recorder(), **FIT_KW)

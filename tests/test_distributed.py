"""Data-parallel fitting (issue 5): two gloo processes on CPU reproduce the single-process fit.

The equivalence is checked on the 8x8 digits MLP, which has no BatchNorm: BatchNorm layers normalise
with their shard's statistics, so convolutional models only match approximately (see
``dgc_pyro.inference.distributed``). Tolerance: max |param difference| < 1e-5 after the fit, losses to
a relative 1e-5 (floating-point summation order is the only difference).

CPU only, whatever ``--device`` says: the ranks here are gloo processes on the CPU. The same code runs nccl ranks,
one per GPU, which needs a machine with two GPUs and is not tested here.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dgc_pyro.cli import build_parser
from dgc_pyro.inference import fit
from dgc_pyro.inference.distributed import DistContext, is_rank_zero, launched_by_torchrun
from dgc_pyro.models import DGC

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

FIT = dict(epochs=2, batch_size=50, lr=3e-3, progress=False, val_fraction=0, seed=3, device="cpu")


def _data(digits, n=130):
    # 130 examples, batch 50: the last batch (30) splits 15/15, every class present.
    return digits.x_train[:n], digits.y_train[:n]


def _model(digits) -> DGC:
    torch.manual_seed(0)
    return DGC(digits.input_shape, digits.num_classes, latent_dim=16, likelihood="normal")


def _max_diff(a: DGC, b: DGC) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_shards_partition_the_batch():
    for n in (1, 2, 7, 50, 51):
        for world in (1, 2, 3):
            bounds = [DistContext(r, world, r, torch.device("cpu"), "gloo").shard(n) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(hi - lo in (n // world, n // world + 1) for lo, hi in bounds)
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))


@pytest.fixture(scope="module")
def single(digits):
    model = _model(digits)
    x, y = _data(digits)
    history = fit(model, x, y, perturbation_rate=0.6, **FIT)
    return model, history


def test_two_processes_match_one_process(digits, single):
    """2 spawned gloo ranks, perturbation step on, uneven last batch: same weights and losses as 1 process."""
    reference, ref_history = single
    model = _model(digits)
    x, y = _data(digits)
    seen = []
    history = fit(
        model,
        x,
        y,
        perturbation_rate=0.6,
        devices=2,
        strategy="ddp",
        callback=lambda epoch, record: seen.append(epoch),
        **FIT,
    )
    assert history.model is model
    assert seen == [1, 2]  # rank 0's epoch records reach the caller's callback
    assert history.losses == pytest.approx(ref_history.losses, rel=1e-5)
    assert [e["perturbation_loss"] for e in history.epochs] == pytest.approx(
        [e["perturbation_loss"] for e in ref_history.epochs], rel=1e-5
    )
    assert _max_diff(model, reference) < 1e-5
    assert not model.training


def test_two_processes_follow_the_same_cosine_schedule(digits):
    x, y = _data(digits)
    reference = _model(digits)
    ref = fit(reference, x, y, perturbation_rate=0.6, lr_schedule="cosine", **FIT)
    model = _model(digits)
    history = fit(model, x, y, perturbation_rate=0.6, lr_schedule="cosine", devices=2, strategy="ddp", **FIT)
    assert [e["lr"] for e in history.epochs] == [e["lr"] for e in ref.epochs] and history.epochs[1]["lr"] < FIT["lr"]
    assert history.losses == pytest.approx(ref.losses, rel=1e-5)
    assert _max_diff(model, reference) < 1e-5


def test_torchrun_style_group_of_one_matches_plain_fit(digits, single, monkeypatch):
    """With the launcher's variables set, fit joins the process group in place (no spawning)."""
    reference, ref_history = single
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    assert launched_by_torchrun() and is_rank_zero()
    model = _model(digits)
    x, y = _data(digits)
    history = fit(model, x, y, perturbation_rate=0.6, devices=1, strategy="ddp", **FIT)
    assert not dist.is_initialized()  # the group it created is gone again
    assert history.losses == pytest.approx(ref_history.losses, rel=1e-6)
    assert _max_diff(model, reference) < 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_rank(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of ``torchrun ... -m dgc_pyro.cli fit --devices 2``: logs every file it writes (all writes of
    results and checkpoints go through dgc_pyro.io's two atomic writers) to ``writes-rank<r>.txt``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    import dgc_pyro.io as io_module
    from dgc_pyro.cli import main

    log = Path(folder) / f"writes-rank{rank}.txt"
    for name in ("atomic_write_bytes", "atomic_write_text"):

        def recording(path, *args, _original=getattr(io_module, name), **kwargs):
            with open(log, "a") as f:
                f.write(f"{Path(path).name}\n")
            return _original(path, *args, **kwargs)

        setattr(io_module, name, recording)
    code = main(
        [
            "fit",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--devices",
            str(world),
            "--strategy",
            "ddp",
            "--device",
            "cpu",
            "--baseline",
            "none",
            "--no-progress",
            "--out",
            str(Path(folder) / "run"),
        ]
    )
    raise SystemExit(code)


def test_only_rank_zero_writes_checkpoints_and_metrics(tmp_path):
    """Two torchrun-style ranks of the CLI's fit (launcher variables set, no spawning by fit): every checkpoint
    and result file is written by rank 0 alone; rank 1 trains in lockstep and writes nothing."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as torchrun starts them
    port = _free_port()
    ranks = [context.Process(target=_cli_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=600)
    for p in ranks:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    assert not (tmp_path / "writes-rank1.txt").exists()
    written = (tmp_path / "writes-rank0.txt").read_text().split()
    assert {"training_state.safetensors", "metrics.json", "model.safetensors"} <= set(written)
    assert written.count("training_state.safetensors") == 2  # after each of the 2 epochs
    assert (tmp_path / "run" / "metrics.json").is_file() and (
        tmp_path / "run" / "checkpoint" / "training_state.safetensors"
    ).is_file()


def test_bad_parallel_arguments_fail_before_spawning(digits):
    model = _model(digits)
    x, y = _data(digits)
    with pytest.raises(ValueError, match="strategy"):
        fit(model, x, y, devices=2, strategy="fsdp", **FIT)
    with pytest.raises(ValueError, match="devices"):
        fit(model, x, y, devices=0, **FIT)
    with pytest.raises(ValueError, match="engine='torch'"):
        fit(model, x, y, devices=2, engine="svi", **FIT)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fit(model, x, y, devices=2, **{**FIT, "device": "cuda"})


def test_cli_fit_has_devices_and_strategy():
    args = build_parser().parse_args(["fit", "--devices", "2", "--strategy", "ddp"])
    assert args.devices == 2 and args.strategy == "ddp"
    args = build_parser().parse_args(["fit"])
    assert args.devices == 1 and args.strategy is None

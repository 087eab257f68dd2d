"""Data-parallel fitting of DGC with ``torch.distributed`` (gloo on CPU, nccl on CUDA).

``fit(model, x, y, devices=N)`` (``strategy="ddp"``) runs the ordinary fit in N processes. Every
process holds the whole (small) training set and draws the same data order, so each one sees the same
global batch; it computes the loss on its contiguous shard of that batch, and the step
(:func:`dgc_pyro.inference.engine.make_step`) sums the shards' gradients with one ``all_reduce`` of a
flat buffer before the identical Adam update on every rank. Gradients are not averaged naively: each
shard's loss is scaled by 1 / (global batch size), so the sum is exactly the single-process gradient of
the global batch, also when the last batch does not split evenly.

What matches a single process fitting the same global batches:

- the reparameterised noise of the guide and of the perturbation step: every rank draws the noise of
  the whole global batch from the identically seeded generator and uses its rows, so with
  ``perturbation_rate=0`` or not, a model without BatchNorm (e.g. the MLP of 8x8 digits) follows the
  single-process trajectory up to floating-point summation order;
- validation and model selection: every rank scores the whole validation split with the same draws and
  takes the same decisions; the checkpoints (``checkpoint_dir``) written by the ranks are identical.

What does not: BatchNorm layers (the convolutional networks) normalise with the statistics of their
shard, not of the global batch, and their running statistics are averaged over the ranks after every
step; objectives that are not sums over examples (``"wae-mmd"``: the MMD of a shard is not a share of
the MMD of the batch) are approximated by the sum of the shards' values.

Launch modes:

- single node: ``fit(..., devices=N)`` spawns N processes (``torch.multiprocessing``, start method
  ``spawn``), rank 0 sends the history back and the parent loads the fitted weights (and the SWAG head of
  ``swag_start``, which every rank collected alike) into the caller's model. ``MASTER_ADDR`` / ``MASTER_PORT`` are honoured when set (default 127.0.0.1 and a free port).
- multi node: start one process per device with ``torchrun`` (it sets ``MASTER_ADDR``,
  ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), e.g.
  ``torchrun --nnodes 2 --nproc-per-node 4 ... -m dgc_pyro.cli fit --devices 4 --strategy ddp``; every
  process then fits in place (no spawning) and returns the same History; progress, callbacks and the
  CLI's output files are left to rank 0 (:func:`is_rank_zero`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import queue as queue_module
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dgc_pyro.config import STRATEGIES, TrainConfig
from dgc_pyro.data.validation import check_xy
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.dist_context import DistContext, check_engine
from dgc_pyro.inference.swag import SwagHead
from dgc_pyro.inference.training import History, train

__all__ = [
    "STRATEGIES",
    "DistContext",
    "check_engine",
    "fit_distributed",
    "is_rank_zero",
    "launched_by_torchrun",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT = timedelta(minutes=30)


def is_rank_zero() -> bool:
    """True outside data-parallel fitting and on rank 0 (read from the launcher's ``RANK``, which spawned ranks
    set too, so it also holds before a torchrun group is initialised)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def launched_by_torchrun() -> bool:
    """True when the standard launcher variables (``RANK``, ``WORLD_SIZE``, ...) are all set."""
    return all(os.environ.get(k) for k in _TORCHRUN_VARS)


def _device_plan(device: Any, devices: int) -> tuple[str, str]:
    """``(device type, backend)`` for ``devices`` processes; errors when there are not enough GPUs."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not dist.is_nccl_available():
            raise ValueError("data-parallel fitting on CUDA needs torch.distributed with NCCL")
        return "cuda", "nccl"
    if dev.type != "cpu":
        raise ValueError(f"data-parallel fitting supports cpu and cuda devices, got {dev}")
    if not dist.is_gloo_available():
        raise ValueError("data-parallel fitting on CPU needs torch.distributed with gloo")
    return "cpu", "gloo"


def _local_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"local rank {local_rank} has no GPU: only {count} visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def fit_distributed(model: Any, x: Any, y: Any, config: TrainConfig, **fit_kwargs: Any) -> History:
    """Data-parallel :func:`~dgc_pyro.inference.fit.fit` over ``config.devices`` processes (see the module docs).

    Takes the keyword arguments of :func:`~dgc_pyro.inference.training.train`. Returns rank 0's
    :class:`~dgc_pyro.inference.fit.History` with ``history.model`` the caller's ``model``, which holds the fitted
    weights.
    """
    # fit's default engine (None) is "torch" here, and the strategy (None) ddp; TrainConfig checked both names.
    config = config.replace(engine=config.engine or "torch", strategy=config.strategy or STRATEGIES[0])
    devices = config.devices
    check_engine(config.engine)
    fit_kwargs["config"] = config
    if not dist.is_available():
        raise ValueError("torch.distributed is not available in this PyTorch build")
    device_type, backend = _device_plan(fit_kwargs.get("device", "auto"), devices)
    if launched_by_torchrun():
        return _fit_in_group(model, x, y, devices, device_type, backend, fit_kwargs)
    if devices == 1:  # nothing to parallelise on this node
        return train(model, x, y, **fit_kwargs)
    if device_type == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices={devices} but only {torch.cuda.device_count()} CUDA GPUs are visible")
    x, y = check_xy(x, y, input_shape=model.input_shape, num_classes=model.num_classes)
    data = {"x": x.contiguous(), "y": y.contiguous()}
    for key in ("x_val", "y_val"):
        if fit_kwargs.get(key) is not None:
            data[key] = torch.as_tensor(fit_kwargs.pop(key)).contiguous()
    return _spawn(model, data, devices, device_type, backend, fit_kwargs)


# ----------------------------------------------------------------------------- in-place (torchrun) ranks
def _fit_in_group(
    model: Any, x: Any, y: Any, devices: int, device_type: str, backend: str, fit_kwargs: dict[str, Any]
) -> History:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
    if local_world != devices:
        raise ValueError(f"devices={devices}, but the launcher started {local_world} processes on this node")
    device = _local_device(device_type, local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=_TIMEOUT,
            **({"device_id": device} if device_type == "cuda" else {}),
        )
    ctx = DistContext(rank, world, local_rank, device, backend)
    kwargs = dict(fit_kwargs, device=device)
    if rank != 0:
        kwargs["progress"] = False
        kwargs["callback"] = None
    try:
        return train(model, x, y, dist=ctx, **kwargs)
    finally:
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- spawned ranks (one node)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _spawn(
    model: Any, data: dict[str, torch.Tensor], nprocs: int, device_type: str, backend: str, fit_kwargs: dict[str, Any]
) -> History:
    import torch.multiprocessing as mp

    if dist.is_initialized():  # spawning from inside a process group would nest groups
        raise RuntimeError("fit(devices=...) was called inside a data-parallel worker")
    callback = fit_kwargs.pop("callback", None)
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    with tempfile.TemporaryDirectory(prefix="dgc_ddp_") as tmp:
        folder = Path(tmp)
        was_device = next(iter(model.parameters())).device
        buffer = io.BytesIO()
        torch.save(model.to("cpu"), buffer)  # the whole module: custom networks travel too
        (folder / "model.pt").write_bytes(buffer.getvalue())
        model.to(was_device)
        torch.save(data, folder / "data.pt")
        messages = mp.get_context("spawn").Queue()
        procs = mp.start_processes(
            _spawn_worker,
            args=(nprocs, addr, port, str(folder), fit_kwargs, callback is not None, messages, device_type, backend),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        result: dict[str, Any] | None = None
        errors: dict[int, BaseException] = {}

        def drain() -> None:
            nonlocal result
            while True:
                try:
                    kind, *rest = messages.get(timeout=0.05)
                except queue_module.Empty:
                    return
                if kind == "epoch" and callback is not None:
                    callback(*rest)
                elif kind == "result":
                    result = rest[0]
                elif kind == "error":
                    errors[rest[0]] = rest[1]

        try:
            while True:
                drain()
                if procs.join(timeout=0.05):
                    break
        except Exception as failure:  # a worker failed: raise its own exception when it sent one
            drain()
            index = getattr(failure, "error_index", None)
            exc = errors.get(index) if index is not None else None
            exc = exc or (errors[min(errors)] if errors else None)
            if exc is not None:
                raise exc from None
            raise
        except BaseException:  # Ctrl-C in the parent: stop the workers too
            for proc in procs.processes:
                if proc.is_alive():
                    proc.terminate()
            raise
        drain()
        if result is None:
            raise RuntimeError("the data-parallel workers finished without a result from rank 0")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    # every rank collected the same SWAG head (identical weights after every step): rank 0's comes back
    model.swag = SwagHead.from_state(model, state["swag"], state["swag_record"]) if state["swag"] else None
    model.to(torch.device("cuda") if device_type == "cuda" else torch.device("cpu"))
    model.eval()
    return History(model=model, **result)


def _spawn_worker(
    local_rank: int,
    nprocs: int,
    addr: str,
    port: int,
    folder: str,
    fit_kwargs: dict[str, Any],
    send_epochs: bool,
    messages: Any,
    device_type: str,
    backend: str,
) -> None:
    rank = local_rank
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        device = _local_device(device_type, local_rank)
        model = torch.load(Path(folder) / "model.pt", weights_only=False)
        data = torch.load(Path(folder) / "data.pt", mmap=True, weights_only=True)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=nprocs,
            timeout=_TIMEOUT,
            **({"device_id": device} if device_type == "cuda" else {}),
        )
        try:
            kwargs = dict(fit_kwargs, device=device)
            for key in ("x_val", "y_val"):
                if key in data:
                    kwargs[key] = data[key]
            if rank != 0:
                kwargs["progress"] = False
            elif send_epochs:
                kwargs["callback"] = lambda epoch, record: messages.put(("epoch", epoch, dict(record)))
            history = train(
                model, data["x"], data["y"], dist=DistContext(rank, nprocs, local_rank, device, backend), **kwargs
            )
            if rank == 0:
                state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
                swag, record = model.swag.to_state() if model.swag is not None else ({}, {})
                torch.save({"model": state, "swag": swag, "swag_record": record}, Path(folder) / "state.pt")
                fields = {f.name: getattr(history, f.name) for f in dataclasses.fields(history) if f.name != "model"}
                messages.put(("result", fields))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        messages.put(("error", rank, _picklable(exc)))
        raise

"""Tests for dgc_pyro.io: atomic writes, JSON conversion and safetensors checkpoints."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import dgc_pyro.io as dio
from dgc_pyro.io import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    write_json,
)


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    atomic_write_text(target, "h\u00e9llo\n")
    assert target.read_text(encoding="utf-8") == "h\u00e9llo\n"
    assert _leftovers(target.parent, {"out.bin"}) == []


def test_atomic_write_keeps_old_file_when_fsync_fails(tmp_path, monkeypatch):
    # The data has been written to the temp file when fsync fails: the target must still
    # hold the old content and the temp file must be gone.
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing_replace(src, dst):
        raise KeyboardInterrupt  # BaseException too: cleanup must still run

    monkeypatch.setattr(dio.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_rejects_non_bytes(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "x", b"bytes")  # type: ignore[arg-type]
    assert _leftovers(tmp_path, set()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_permissions(tmp_path):
    fresh = tmp_path / "fresh"
    atomic_write_bytes(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    existing = tmp_path / "existing"
    existing.write_bytes(b"x")
    existing.chmod(0o640)
    atomic_write_bytes(existing, b"y")
    assert existing.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------


def test_write_json_handles_numpy_and_tuples(tmp_path):
    path = tmp_path / "r.json"
    obj = {
        "b": np.float32(0.5),
        "a": (1, 2),
        "arr": np.arange(3),
        "farr": np.array([[0.25, np.nan]]),
        "i": np.int64(7),
        "flag": np.bool_(True),
        "nan": float("nan"),
        "inf": np.float64(np.inf),
        "t": torch.tensor([1.5, 2.5]),
        "p": Path("runs/x"),
        "nested": {3: [np.int32(1), {"z": np.float16(1.0)}]},
    }
    write_json(path, obj)
    text = path.read_text()
    assert text.endswith("\n")
    loaded = json.loads(text)
    assert loaded == {
        "a": [1, 2],
        "arr": [0, 1, 2],
        "b": 0.5,
        "farr": [[0.25, None]],
        "flag": True,
        "i": 7,
        "inf": None,
        "nan": None,
        "nested": {"3": [1, {"z": 1.0}]},
        "p": "runs/x",
        "t": [1.5, 2.5],
    }
    assert list(loaded) == sorted(loaded)  # sort_keys
    assert "NaN" not in text and "Infinity" not in text
    assert '\n  "a"' in text  # indent=2


def test_write_json_unserialisable_leaves_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _leftovers(tmp_path, {"r.json"}) == []


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(4, 3, generator=g),
        "encoder.bias": torch.zeros(4),
        "counts": torch.tensor([5, 50, 500], dtype=torch.int64),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.0),
    }


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = _tensors()
    meta = {"epoch": 3, "config": {"lr": 1e-3, "dims": (4, 3)}, "acsa": np.float64(0.5), "format_version": "mine"}
    save_checkpoint(path, tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert loaded[name].device.type == "cpu"
        torch.testing.assert_close(loaded[name], t, rtol=0, atol=0)
    # The caller's metadata comes back as saved (in JSON types), and a user key named
    # "format_version" does not collide with the file's own version.
    assert loaded_meta == {"epoch": 3, "config": {"lr": 1e-3, "dims": [4, 3]}, "acsa": 0.5, "format_version": "mine"}
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    assert header["__metadata__"]["format_version"] == str(FORMAT_VERSION)
    assert json.loads(header["__metadata__"]["dgc_pyro"])["epoch"] == 3
    assert _leftovers(path.parent, {"model.safetensors"}) == []


def test_checkpoint_handles_shared_noncontiguous_and_grad_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    param = torch.nn.Parameter(torch.ones(2))
    tensors = {"base": base, "view": base[1], "transposed": base.t(), "tied": base, "param": param}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta == {}
    for name, t in tensors.items():
        torch.testing.assert_close(loaded[name], t.detach())
    assert not loaded["param"].requires_grad
    # Loaded tensors are independent of each other.
    loaded["base"].add_(1)
    assert loaded["tied"][0, 0].item() == 0.0


def test_checkpoint_map_location(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", {"x": torch.ones(2)}, {})
    loaded, _ = load_checkpoint(tmp_path / "c.safetensors", map_location=torch.device("cpu"))
    assert loaded["x"].device == torch.device("cpu")
    if torch.cuda.is_available():
        loaded, _ = load_checkpoint(tmp_path / "c.safetensors", map_location="cuda")
        assert loaded["x"].device.type == "cuda"


def test_save_checkpoint_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"x": torch.ones(2)}, {"epoch": 1})
    before = path.read_bytes()

    def failing_save(tensors, metadata=None):
        raise RuntimeError("serialiser exploded")

    monkeypatch.setattr(dio.safetensors.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="exploded"):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"epoch": 2})
    monkeypatch.undo()

    # Failure after serialising, during the write itself.
    monkeypatch.setattr(dio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"epoch": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)[1] == {"epoch": 1}
    assert _leftovers(tmp_path, {"model.safetensors"}) == []


def test_save_checkpoint_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        save_checkpoint(tmp_path / "c", {"x": np.ones(2)}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="names must be str"):
        save_checkpoint(tmp_path / "c", {1: torch.ones(2)}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metadata must be a dict"):
        save_checkpoint(tmp_path / "c", {"x": torch.ones(2)}, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_checkpoint(tmp_path / "c", {"x": torch.ones(2)}, {"f": object()})
    assert not (tmp_path / "c").exists()


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)


class _Payload:
    """Unpickling this calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    # Control: the payload really does create its marker when unpickled.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    zipped = tmp_path / "evil.pt"
    torch.save({"weights": _Payload(marker)}, zipped)  # torch.save's zip container
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="not a valid dgc_pyro checkpoint") as info:
            load_checkpoint(path)
        assert "pickle" in str(info.value)
        assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _tensors(), {"epoch": 1})
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 20, 7, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a valid dgc_pyro checkpoint"):
            load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    rng = np.random.default_rng(0)
    for size in (1, 64, 4096):
        path.write_bytes(rng.bytes(size))
        with pytest.raises(CheckpointError, match="not a valid dgc_pyro checkpoint"):
            load_checkpoint(path)


def test_corrupted_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"x": torch.ones(4)}, {"epoch": 1})
    data = bytearray(path.read_bytes())
    data[8] = ord("X")  # first byte of the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_plain_safetensors_without_dgc_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(safetensors.torch.save({"x": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="'dgc_pyro' metadata"):
        load_checkpoint(path)
    path.write_bytes(safetensors.torch.save({"x": torch.ones(2)}, metadata={"other": "1"}))
    with pytest.raises(CheckpointError, match="'dgc_pyro' metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"dgc_pyro": "{}", "format_version": "2"}, "format_version 2.*upgrade"),
        ({"dgc_pyro": "{}"}, "format_version"),
        ({"dgc_pyro": "{}", "format_version": "one"}, "format_version"),
        ({"dgc_pyro": "{not json", "format_version": "1"}, "not valid JSON"),
        ({"dgc_pyro": "[1, 2]", "format_version": "1"}, "not a JSON object"),
    ],
)
def test_bad_metadata(tmp_path, header, match):
    path = tmp_path / "c.safetensors"
    path.write_bytes(safetensors.torch.save({"x": torch.ones(2)}, metadata=header))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------
# Output folders: writability before the work, failed writes that name their file, sets of files
# ---------------------------------------------------------------------------------------


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    # write(2) and fsync(2) errors carry no file name ("[Errno 28] No space left on device").
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dio.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as info:
        write_json(tmp_path / "metrics.json", {"a": 1})
    monkeypatch.undo()
    assert info.value.errno == 28
    assert str(info.value) == f"[Errno 28] No space left on device: '{tmp_path / 'metrics.json'}'"
    assert _leftovers(tmp_path, set()) == []


def test_writable_problem_probes_without_leaving_anything(tmp_path, monkeypatch):
    assert dio.writable_problem(tmp_path) is None
    assert dio.writable_problem(tmp_path / "new" / "run") is None  # probed in tmp_path, nothing created
    assert _leftovers(tmp_path, set()) == []

    def refuse(directory, name):
        raise PermissionError(13, "Permission denied", str(directory / name))

    monkeypatch.setattr(dio, "_create_temp", refuse)  # chmod does not stop root, who runs the tests
    assert dio.writable_problem(tmp_path) == "is not writable: Permission denied"
    assert (
        dio.writable_problem(tmp_path / "new") == f"is not writable (its nearest existing folder {tmp_path}): "
        "Permission denied"
    )
    monkeypatch.undo()
    monkeypatch.setattr(dio.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**20})())
    assert dio.writable_problem(tmp_path, need_bytes=2**20) is None
    assert dio.writable_problem(tmp_path, need_bytes=3 * 2**20) == (
        "has only 1.0 MiB free on its file system, and about 3.0 MiB will be written"
    )


def test_staged_folder_writes_the_set_or_nothing(tmp_path):
    out = tmp_path / "aug"
    with dio.staged_folder(out) as stage:
        atomic_write_bytes(stage / "a.bin", b"a")
        assert not out.exists()  # nothing is visible until the set is complete
        atomic_write_bytes(stage / "b.bin", b"b")
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]
    assert _leftovers(tmp_path, {"aug"}) == []

    # a second set into the existing folder fails half-way ...
    with pytest.raises(OSError) as info, dio.staged_folder(out) as stage:
        atomic_write_bytes(stage / "a.bin", b"new a")
        raise OSError(28, "No space left on device", str(stage / "b.bin"))
    assert str(info.value) == f"[Errno 28] No space left on device: '{out / 'b.bin'}'"  # named where it was going
    assert (out / "a.bin").read_bytes() == b"a"  # ... and the old set is untouched, nothing is left over
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]

    with dio.staged_folder(out) as stage:  # a complete second set replaces files of the same names
        atomic_write_bytes(stage / "a.bin", b"new a")
    assert (out / "a.bin").read_bytes() == b"new a" and (out / "b.bin").read_bytes() == b"b"
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]

    with pytest.raises(KeyboardInterrupt), dio.staged_folder(tmp_path / "never") as stage:
        atomic_write_bytes(stage / "a.bin", b"a")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path, {"aug"}) == []

"""Safe, atomic persistence: atomic file writes, strict JSON, and safetensors checkpoints.

Checkpoints are stored in the safetensors format and loaded without pickle, so a checkpoint
file from an untrusted source can at worst be refused, never execute code.

Checkpoint layout: the safetensors header's string metadata holds two keys,

* ``"format_version"``: ``"1"`` (the layout version written by this module), and
* ``"dgc_pyro"``: the caller's metadata dict, serialised as JSON (same conversion as
  :func:`write_json`).

The version lives beside the caller's metadata rather than inside it so that
``load_checkpoint`` returns exactly the dict that was saved, and a user key called
``format_version`` cannot collide with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "folder_problem",
    "load_checkpoint",
    "nearest_existing",
    "save_checkpoint",
    "staged_folder",
    "to_jsonable",
    "writable_problem",
    "write_json",
]

FORMAT_VERSION = 1
_META_KEY = "dgc_pyro"
_VERSION_KEY = "format_version"

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """Raised when a file is not a valid (or not a readable) dgc_pyro checkpoint."""


# ---------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------


def nearest_existing(path: PathLike) -> Path | None:
    """``path`` itself if it exists, else its nearest existing parent (None if none exists)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists()), None)


def folder_problem(path: PathLike) -> str | None:
    """Why ``path`` cannot be, or become, a folder, in words to follow its name; None when it can.

    Checked before long work, so that a bad output folder fails at once rather than at the first write.
    Nothing is created.
    """
    path = Path(path)
    existing = nearest_existing(path)
    if existing == path and not path.is_dir():
        return "exists and is not a folder"
    if existing is not None and not existing.is_dir():
        return f"cannot be created: {existing} is a file, not a folder"
    return None


def writable_problem(path: PathLike, need_bytes: int = 0) -> str | None:
    """Why ``need_bytes`` of files cannot be written in folder ``path`` (or in the nearest existing folder above
    it, where it would be created), in words to follow its name; None when they can, as far as can be told.

    Checked before long work, so that a read-only folder or a full disk fails at once rather than after
    training: a hidden, empty probe file is created and removed at once (nothing else is created), and the
    file system must have ``need_bytes`` free.
    """
    existing = nearest_existing(Path(path))
    if existing is None or not existing.is_dir():
        return None  # folder_problem's case
    where = "" if existing == Path(path) else f" (its nearest existing folder {existing})"
    try:
        fd, tmp = _create_temp(existing, "write-probe")
    except OSError as e:
        return f"is not writable{where}: {e.strerror or e}"
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        return (
            f"has only {free / 2**20:.1f} MiB free on its file system{where}, and about "
            f"{need_bytes / 2**20:.1f} MiB will be written"
        )
    return None


@contextlib.contextmanager
def staged_folder(path: PathLike) -> Iterator[Path]:
    """Write a set of files as one: the ``with`` block writes them into the temporary folder it is given, whose
    files then become ``path``'s in renames only (the whole folder when ``path`` does not exist yet, else one
    rename per file, replacing files of the same names). On any failure inside the block the temporary folder is
    removed, so either the whole set arrives or nothing does; an OSError naming a file in the temporary folder
    is re-raised naming the file in ``path`` instead.
    """
    target = Path(path)
    # Beside the target, or inside an existing one, so that every rename stays on one file system.
    if target.is_dir():
        stage = target / f".staged.{secrets.token_hex(6)}.tmp"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    stage.mkdir()
    try:
        yield stage
        if not target.exists():
            os.replace(stage, target)
        else:
            for item in sorted(stage.iterdir()):
                os.replace(item, target / item.name)
            stage.rmdir()
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        name = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
        if name is not None and e.errno is not None and name.is_relative_to(stage):
            raise type(e)(e.errno, e.strerror, str(target / name.relative_to(stage))) from e
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(target if target.is_dir() else target.parent)


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk. Some platforms
    # (Windows) cannot open a directory; durability there is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    # os.open with mode 0o666 lets the umask decide permissions, as for a plain open();
    # tempfile.mkstemp would force 0o600 onto the final file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and
    then renamed over ``path``; the directory is fsynced afterwards. Readers therefore see
    either the old file or the complete new one. On any failure (including
    KeyboardInterrupt) the temporary file is removed and an existing ``path`` is untouched.
    Parent directories are created as needed. An existing target's permission bits are kept.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target.parent, target.name)
    try:
        # Once fdopen succeeds the file object owns fd; closing fd again here could close
        # an unrelated descriptor that another thread has since been given.
        try:
            fh = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # A failed write(2) or fsync(2) names no file ("[Errno 28] No space left on device"): name the target.
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(target)) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`).

    Encoded as UTF-8 by default; newlines are written as given (no platform translation).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    # bool before int: bool is an int subclass, and json would write True as "true".
    if isinstance(key, (bool, np.bool_)):
        return "true" if key else "false"
    if isinstance(key, (int, np.integer)):
        return str(int(key))
    raise TypeError(f"JSON object keys must be str or int, got {type(key).__name__}: {key!r}")


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types.

    numpy scalars become Python scalars; numpy arrays, torch tensors, tuples and sets become
    lists (sets sorted); ``pathlib.Path`` becomes ``str``; int dict keys become strings.
    Non-finite floats (NaN, +/-inf) become ``None`` (JSON ``null``): strict JSON has no
    NaN, and refusing to write would lose a whole results file at the end of a long run
    over one undefined number. Anything else raises TypeError.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot convert numpy array of dtype {obj.dtype} to JSON")
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, allow_nan=False, **kwargs)


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (indent=2, sorted keys, trailing newline).

    Values are converted with :func:`to_jsonable`; in particular NaN/inf are written as
    ``null``. The conversion happens before the file is touched, so an unserialisable
    object leaves an existing file intact.
    """
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}: {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TypeError(f"tensors[{name!r}] has layout {tensor.layout}; only dense tensors can be saved")
        out[name] = tensor.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share storage (e.g. tied weights, or views of one
    # buffer); give every such tensor its own copy.
    by_storage: dict[int, list[str]] = {}
    for name, tensor in out.items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    for names in by_storage.values():
        if len(names) > 1:
            for name in names:
                out[name] = out[name].clone()
    return out


def save_checkpoint(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Save ``tensors`` and JSON-able ``metadata`` to ``path`` as an atomic safetensors file.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage are
    cloned. ``metadata`` is converted like :func:`write_json` (NaN -> null) and stored under
    the header key ``"dgc_pyro"`` beside ``"format_version": "1"``.
    """
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    prepared = _prepare_tensors(tensors)
    header = {_META_KEY: _dumps(metadata), _VERSION_KEY: str(FORMAT_VERSION)}
    data = safetensors.torch.save(prepared, metadata=header)
    atomic_write_bytes(path, data)


def _invalid(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid dgc_pyro checkpoint: {reason}")


def _read_header(data: bytes, path: Path) -> dict[str, Any]:
    # Reached only after safetensors has accepted the bytes, so the layout is known-good;
    # the checks are defensive. Only JSON is parsed here, never pickle.
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(path, f"unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise _invalid(path, "safetensors header is not a JSON object")
    return header


def load_checkpoint(
    path: PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(tensors, metadata)``.

    Never unpickles: the file is parsed by safetensors (tensors) and ``json`` (metadata).
    The file is read once, so tensors and metadata always come from the same version of it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a safetensors file (e.g. a pickle / ``torch.save``
            file or random bytes), is truncated or corrupted, lacks the ``"dgc_pyro"``
            metadata, or was written by a newer format version.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(2, "checkpoint file not found", str(p)) from None
    try:
        loaded = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends; the cause is kept for debugging
        hint = ""
        if data[:2] == b"PK" or data[:1] == b"\x80":
            hint = " (it looks like a pickle/torch.save file, which is never loaded for safety)"
        raise _invalid(p, f"not a safetensors file or truncated/corrupted ({exc}){hint}") from exc

    raw_meta = _read_header(data, p).get("__metadata__")
    if not isinstance(raw_meta, dict) or _META_KEY not in raw_meta:
        raise _invalid(p, f"safetensors file without {_META_KEY!r} metadata (written by another program?)")
    version_text = raw_meta.get(_VERSION_KEY)
    try:
        version = int(version_text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _invalid(p, f"missing or malformed format_version {version_text!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format_version {version}, but this dgc_pyro reads versions up to "
            f"{FORMAT_VERSION}; upgrade dgc_pyro to load it"
        )
    if version < 1:
        raise _invalid(p, f"unsupported format_version {version}")
    try:
        metadata = json.loads(raw_meta[_META_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise _invalid(p, f"{_META_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise _invalid(p, f"{_META_KEY!r} metadata is not a JSON object")

    device = torch.device(map_location)
    tensors = {name: t.to(device) for name, t in loaded.items()}
    return tensors, metadata

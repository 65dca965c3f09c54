"""Atomic checkpoints: weights, optimizer and every stream's serving state in one safetensors file.

A checkpoint is a single ``.safetensors`` file (tensors cannot execute code when loaded, unlike a
pickle) whose header carries a JSON manifest: ``model_args`` (the architecture travels with the
weights, as in nanoGPT), the normaliser, the training recipe, the model version and the stream ids.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the old file, so a
crash leaves either the old checkpoint or the new one, never half of one. Every tensor and the
manifest carry a CRC-32 checked at load, and the last few checkpoints are kept (``name.1.ext``, ...)
so a damaged one can fall back to the one before (docs/reliability.md).

The sample journal beside it is ``journal`` (re-exported here for its importers)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from forecaster import __version__
from forecaster.errors import CheckpointError
from forecaster.journal import Journal as Journal  # its old home, kept for importers
from forecaster.journal import Messages as Messages
from forecaster.model import Forecaster, ModelConfig
from forecaster.normalize import NormalizerConfig
from forecaster.store import STATE_KEYS

FORMAT = "forecaster-checkpoint/1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "default.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, loaded and checked."""

    model: Forecaster
    normalizer: NormalizerConfig
    manifest: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    stream_names: list[str] = field(default_factory=list)
    stream_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_version(self) -> int:
        return int(self.manifest.get("model_version", 0))


def source_id(path: Path | str | None) -> str:
    """A model file's identity (SHA-256 of its bytes, 16 hex digits; None: the shipped model):
    recorded in every state checkpoint, so a restart with another ``model.checkpoint`` is seen."""
    file = Path(path if path is not None else DEFAULT_CHECKPOINT)
    try:
        data = file.read_bytes()
    except OSError as exc:  # as load_checkpoint says it: one line naming the file, no traceback
        raise CheckpointError(file, "file", exc.strerror or "cannot be read") from exc
    return hashlib.sha256(data).hexdigest()[:16]


def kept_path(path: Path, index: int) -> Path:
    """The ``index``-th older checkpoint kept beside ``path`` (0: ``path`` itself).

    >>> kept_path(Path("state/checkpoint.safetensors"), 2).as_posix()
    'state/checkpoint.2.safetensors'
    """
    return path if index == 0 else path.with_name(f"{path.stem}.{index}{path.suffix}")


def kept_paths(path: Path) -> list[Path]:
    """``path`` and the older checkpoints kept beside it that exist, newest first."""
    path = Path(path)
    older = []
    for other in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        index = other.name[len(path.stem) + 1 : -len(path.suffix) or None]
        if index.isdigit():
            older.append((int(index), other))
    return [p for p in (path,) if p.exists()] + [p for _, p in sorted(older)]


def _rotate(path: Path, keep: int) -> None:
    """Make room for a new ``path``: ``.1`` becomes ``.2`` and so on (the oldest beyond ``keep``
    goes), and ``.1`` becomes a hard link to the current file, so ``path`` never disappears: a
    crash anywhere in here leaves a loadable newest checkpoint."""
    for index in range(keep - 1, 0, -1):
        older = kept_path(path, index)
        if not older.exists():
            continue
        if index + 1 >= keep:
            older.unlink()
        else:
            os.replace(older, kept_path(path, index + 1))
    if keep > 1 and path.exists():
        try:
            os.link(path, kept_path(path, 1))
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, kept_path(path, 1))


def write_atomic(path: Path, write: Callable[[str], None], keep: int = 1) -> None:
    """``write(temp_path)`` in the same folder, fsync, rename, fsync the folder; with ``keep`` >
    1 the ``keep - 1`` previous files stay as ``name.1.ext``, ``name.2.ext``, ..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        write(tmp)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _rotate(path, keep)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class CheckpointData:
    """A checkpoint's tensors and header, copied out of the live objects (``snapshot``), so it can
    be written from another thread while the engine and the learner go on changing theirs."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def write(self, path: Path | str, keep: int = 1) -> None:
        """Checksum, serialise and write atomically (``keep``: see ``write_atomic``).
        ``save_file`` releases the GIL while it works (measured: the engine thread's longest
        pause 1.7 ms beside it, 33 ms beside ``save``), and so does ``crc32`` past 5 KB."""
        metadata = {
            **self.metadata,
            "checksums": json.dumps(checksums(self.tensors, self.metadata)),
        }
        write_atomic(
            Path(path), lambda tmp: save_file(self.tensors, tmp, metadata=metadata), keep=keep
        )


def _crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as stored (any dtype; a 0-d tensor too; an empty one: no
    bytes, which torch cannot view as bytes: a daemon stopped before any sample came)."""
    if tensor.numel() == 0:
        return zlib.crc32(b"")
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """CRC-32 of every tensor and of the manifest: one flipped bit anywhere in them is found at
    load (safetensors itself checks only the header's offsets)."""
    return {
        "manifest": zlib.crc32(metadata.get("manifest", "").encode()),
        "tensors": {name: _crc(tensor) for name, tensor in tensors.items()},
    }


def verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Compare a loaded checkpoint with the checksums it was written with (none: written before
    checksums, or by another tool: taken as it is)."""
    if "checksums" not in metadata:
        return
    try:
        want = json.loads(metadata["checksums"])
    except ValueError as exc:
        raise CheckpointError(path, "checksums", f"not JSON ({exc})") from exc
    got = checksums(tensors, metadata)
    if got["manifest"] != want.get("manifest"):
        raise CheckpointError(path, "manifest", "checksum mismatch: the file is damaged")
    if set(got["tensors"]) != set(want.get("tensors", {})):
        raise CheckpointError(path, "checksums", "tensors differ from those checksummed")
    for name, crc in got["tensors"].items():
        if crc != want["tensors"][name]:
            raise CheckpointError(path, name, "checksum mismatch: the tensor data is damaged")


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def snapshot(
    model: Forecaster,
    normalizer: NormalizerConfig,
    *,
    model_version: int = 0,
    recipe: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stream_names: list[str] | None = None,
    stream_arrays: dict[str, np.ndarray] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> CheckpointData:
    """Everything needed to resume serving (and learning) exactly where it stopped, copied.

    ``stream_arrays`` are taken as they are: ``StreamTable.arrays()`` already gives copies.
    """
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": _copy(v) for k, v in model.state_dict().items()
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "forecaster_version": __version__,
        "model_args": model.config.to_dict(),
        "normalizer": {
            "kind": normalizer.kind,
            "halflife": normalizer.halflife,
            "clip": normalizer.clip,
            "gain_halflife": normalizer.gain_halflife,
        },
        "model_version": int(model_version),
        "recipe": recipe or {},
        "info": info or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "streams": list(stream_names or []),
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        manifest["optimizer"] = {
            "param_groups": copy.deepcopy(state["param_groups"]),
            "state_keys": {},
        }
        for index, entry in state["state"].items():
            keys = []
            for key, value in entry.items():
                tensors[f"optim.{index}.{key}"] = _copy(
                    value if torch.is_tensor(value) else torch.tensor(value)
                )
                keys.append(key)
            manifest["optimizer"]["state_keys"][str(index)] = keys
    for key, array in (stream_arrays or {}).items():
        tensors[f"streams.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    for key, tensor in (extra or {}).items():
        tensors[f"extra.{key}"] = _copy(tensor)
    return CheckpointData(tensors, {"format": FORMAT, "manifest": json.dumps(manifest)})


def save_checkpoint(
    path: Path | str, model: Forecaster, normalizer: NormalizerConfig, **kw: Any
) -> None:
    """``snapshot`` and write now (training, tests); the daemon writes its snapshots in the
    background."""
    snapshot(model, normalizer, **kw).write(path)


def load_checkpoint(
    path: Path | str | None = None, device: torch.device | str = "cpu"
) -> Checkpoint:
    """Load and check a checkpoint; any defect raises CheckpointError naming file and field."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(path, "file", "no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, "header", f"not a readable safetensors file ({exc})") from exc
    verify(path, tensors, metadata)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            path, "format", f"expected {FORMAT!r}, got {metadata.get('format')!r}"
        )
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, "manifest", f"missing or not JSON ({exc})") from exc
    try:
        config = ModelConfig.from_dict(dict(manifest["model_args"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, "model_args", str(exc)) from exc
    try:
        normalizer = NormalizerConfig(**manifest["normalizer"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(path, "normalizer", str(exc)) from exc

    model = Forecaster(config)
    expected = model.state_dict()
    weights = {}
    for name, want in expected.items():
        got = tensors.get(f"model.{name}")
        if got is None:
            raise CheckpointError(path, f"model.{name}", "missing")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                path, f"model.{name}", f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
        if not torch.isfinite(got).all():
            raise CheckpointError(path, f"model.{name}", "holds NaN or inf")
        weights[name] = got
    model.load_state_dict(weights)
    model.to(device)

    optimizer = None
    if "optimizer" in manifest:
        opt = manifest["optimizer"]
        state = {
            int(index): {key: tensors[f"optim.{index}.{key}"] for key in keys}
            for index, keys in opt["state_keys"].items()
        }
        optimizer = {"state": state, "param_groups": opt["param_groups"]}

    names = [str(n) for n in manifest.get("streams", [])]
    arrays = {
        k[len("streams.") :]: v.numpy() for k, v in tensors.items() if k.startswith("streams.")
    }
    for key, array in arrays.items():
        width = array.shape[1] if key in STATE_KEYS else array.shape[0]
        if width != len(names):
            raise CheckpointError(
                path, f"streams.{key}", f"{width} streams, manifest names {len(names)}"
            )
    if names and "state" in arrays:
        want = (config.num_layers, len(names), model.state_width)
        if tuple(arrays["state"].shape) != want:
            raise CheckpointError(
                path, "streams.state", f"shape {arrays['state'].shape}, expected {want}"
            )
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(model, normalizer, manifest, optimizer, names, arrays, extra)


def read_manifest(path: Path | str) -> dict[str, Any]:
    """A checkpoint's manifest from its header alone (no tensor is read); {} if unreadable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(json.loads((handle.metadata() or {})["manifest"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return {}


def journal_position(checkpoint: Checkpoint) -> int:
    """The last journal row a checkpoint includes (0 for one written without a journal)."""
    return int(checkpoint.manifest.get("info", {}).get("journal_position", 0))

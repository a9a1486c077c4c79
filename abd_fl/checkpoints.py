"""Teacher checkpoints: save a model's state dict, load one a user brings (torch only).

Formats, by file extension: ``.pt`` / ``.pth`` (``torch.save`` of a state dict, loaded with
``torch.load(..., map_location="cpu", weights_only=True)``, so a file that would run code
when unpickled is rejected) and ``.safetensors`` (``safetensors.torch``). A ``.pt`` file
holding ``{"state_dict": {...}}`` (a common training-script layout) is accepted too.

Every failure is a :class:`CheckpointError` with one line naming the file and the
problem: missing file, unsupported extension, a file ``weights_only`` refuses or that is
truncated / not a checkpoint, contents that are not a state dict, non-finite values, or
keys / shapes that do not fit the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointError", "load_state_dict_file", "load_teacher", "save_state_dict", "find_checkpoint"]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".safetensors")


class CheckpointError(ValueError):
    """A teacher checkpoint that cannot be used (one line: the file and the reason)."""


def _first_line(err: BaseException) -> str:
    """The informative sentence of a loader's (often multi-paragraph) error message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    generic = ("Weights only load failed", "Check the documentation of torch.load")
    useful = [ln for ln in lines if not ln.startswith(generic)] or lines or [type(err).__name__]
    sentence = useful[0].split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {sentence[:200]}"


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"teacher checkpoint '{path}' has unsupported extension '{path.suffix}'; use one of: {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return suffix


def save_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict (CPU, contiguous copies) to ``path``; the extension picks the format."""
    path = Path(path)
    suffix = _suffix(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (CPU tensors), checking it is one."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: '{path}'")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"teacher checkpoint '{path}' is not a readable safetensors file ({_first_line(err)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError (weights_only refusal), RuntimeError/EOFError (truncated), ...
            raise CheckpointError(
                f"teacher checkpoint '{path}' was rejected by torch.load(weights_only=True): tampered, truncated "
                f"or not a torch state dict ({_first_line(err)})"
            ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"teacher checkpoint '{path}' does not hold a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"teacher checkpoint '{path}' is not a state dict: entries {bad[:3]} are not name -> tensor")
    for key, value in obj.items():
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"teacher checkpoint '{path}' has non-finite values in '{key}'")
    return dict(obj)


def load_teacher(model: nn.Module, path: str | Path, model_name: str | None = None) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (strict: same keys and shapes); returns
    ``model`` in eval mode."""
    state = load_state_dict_file(path)
    expected = model.state_dict()
    what = f"model '{model_name}'" if model_name else f"the {type(model).__name__} model"
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"teacher checkpoint '{path}' does not fit {what}: missing keys {missing[:3]} ({len(missing)}), "
            f"unexpected keys {unexpected[:3]} ({len(unexpected)})"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"teacher checkpoint '{path}' does not fit {what}: '{key}' has shape {tuple(state[key].shape)} "
                f"in the file, {tuple(ref.shape)} in the model"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def find_checkpoint(folder: str | Path, stem: str) -> Path | None:
    """``<folder>/<stem>.{pt,pth,safetensors}`` (the first that exists), or None."""
    for suffix in CHECKPOINT_SUFFIXES:
        candidate = Path(folder) / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def client_checkpoint_paths(spec: Any, num_clients: int) -> dict[int, Path]:
    """``attack.teacher_checkpoints`` -> ``{partition id: file}``.

    ``spec`` is None (no client uses a checkpoint), a mapping ``{partition id: path}``
    (keys may be strings, as after a JSON round trip), or a folder holding
    ``client_<partition id>.{pt,pth,safetensors}`` files. Files are not opened here.
    """
    if spec is None:
        return {}
    if isinstance(spec, (str, Path)):
        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(f"attack.teacher_checkpoints folder not found: '{folder}'")
        found = {pid: find_checkpoint(folder, f"client_{pid}") for pid in range(num_clients)}
        paths = {pid: p for pid, p in found.items() if p is not None}
        if not paths:
            raise CheckpointError(
                f"attack.teacher_checkpoints folder '{folder}' has no client_<id>.pt|.pth|.safetensors file for ids 0..{num_clients - 1}"
            )
        return paths
    if not isinstance(spec, Mapping):
        raise CheckpointError(
            f"attack.teacher_checkpoints must be null, a folder or a mapping {{partition id: path}}, got {type(spec).__name__}"
        )
    paths = {}
    for key, value in spec.items():
        try:
            pid = int(key)
        except (TypeError, ValueError):
            pid = None
        if pid is None or isinstance(key, bool) or str(pid) != str(key).strip() or not 0 <= pid < num_clients:
            raise CheckpointError(f"attack.teacher_checkpoints keys must be partition ids in [0, {num_clients - 1}], got {key!r}")
        if not isinstance(value, (str, Path)) or not str(value):
            raise CheckpointError(f"attack.teacher_checkpoints[{pid}] must be a file path, got {value!r}")
        paths[pid] = Path(value)
    return paths

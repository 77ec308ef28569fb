"""Reading OLMo-core checkpoints and HF directories safely (no pickled code runs).

* Tensors come from safetensors files, or ``torch.load(weights_only=True)``.
* OLMo-core's distributed checkpoints (``torch.distributed.checkpoint``) store their
  index (``.metadata``) as a pickle that torch loads with plain ``pickle.load``. Before
  handing the folder to OLMo-core's loader, :func:`check_dcp_metadata` unpickles it
  with an allow-list of the checkpoint-metadata classes; any other global (a function,
  an unknown class) is refused, so no pickled code can run.
* Truncated or corrupted files raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

SAFE_DCP_MODULE_PREFIXES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "olmo_core.distributed.checkpoint.filesystem",
)
SAFE_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown kind."""


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only torch dtypes, a few plain helpers, and the *classes* (dataclasses,
    enums) of the checkpoint-metadata modules; anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in SAFE_DCP_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(SAFE_DCP_MODULE_PREFIXES) and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from checkpoint metadata")


def check_dcp_metadata(dcp_dir: Path) -> None:
    """Unpickles ``dcp_dir/.metadata`` with an allow-list; raises :class:`CheckpointError`."""
    path = dcp_dir / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{dcp_dir} is not a distributed checkpoint: no .metadata file")
    try:
        _AllowListUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"unsafe or corrupted checkpoint metadata {path}: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise CheckpointError(f"corrupted or truncated checkpoint metadata {path}: {err}") from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a clear error when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"corrupted or truncated safetensors file {path}: {err}") from err


def read_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, loaded with ``weights_only=True`` (no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds more than plain weights (refused, weights_only=True): {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"corrupted or truncated weights file {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return state


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Weights of a HF directory: ``model.safetensors`` or a sharded index."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"corrupted safetensors index {index}: {err}") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(model_dir / shard))
        return state
    raise CheckpointError(f"{model_dir} has no model.safetensors (only safetensors weights are read)")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` with a clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupted JSON file {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data

"""Reading OLMo-core checkpoints and HF directories safely (no pickled code runs).

* Tensors come from safetensors files, or ``torch.load(weights_only=True)``.
* OLMo-core's distributed checkpoints (``torch.distributed.checkpoint``) store their
  index (``.metadata``) as a pickle that OLMo-core loads with plain ``pickle.load``, and
  every tensor / object item of the ``__*_*.distcp`` files as a ``torch.save`` stream that
  it loads with ``torch.load(weights_only=False)``. Before a folder is handed to
  OLMo-core, :func:`check_dcp_checkpoint` unpickles the index with an allow-list of the
  checkpoint-metadata classes and opens every item the index points at with
  ``torch.load(weights_only=True, map_location="meta")`` (reads the pickle, not the tensor
  bytes); any other global (a function, an unknown class) is refused.
* A training step folder adds the trainer state ``train/rank*.pt`` (also read by OLMo-core
  with ``weights_only=False``): :func:`check_train_checkpoint` opens each with
  ``weights_only=True`` (plus the numpy array classes of the saved RNG state) first.
* Truncated or corrupted files raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
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


def _plain_data_class(obj: object) -> bool:
    """Dataclasses, enums and named tuples: building one runs no code beyond field assignment."""
    return isinstance(obj, type) and (
        dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum) or (issubclass(obj, tuple) and hasattr(obj, "_fields"))
    )


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only torch dtypes, a few plain helpers, and the plain-data *classes*
    (dataclasses, enums, named tuples) of the checkpoint-metadata modules; anything
    else (functions, readers/writers, other modules) raises."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in SAFE_DCP_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(SAFE_DCP_MODULE_PREFIXES) and not name.startswith("__"):
            obj = super().find_class(module, name)
            if _plain_data_class(obj):
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from checkpoint metadata")


def check_dcp_metadata(dcp_dir: Path) -> Any:
    """Unpickles ``dcp_dir/.metadata`` with an allow-list and returns it (a DCP ``Metadata``);
    raises :class:`CheckpointError` naming the file."""
    path = dcp_dir / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{dcp_dir} is not a distributed checkpoint: no .metadata file")
    try:
        metadata = _AllowListUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"unsafe or corrupted checkpoint metadata {path}: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as err:
        raise CheckpointError(f"corrupted or truncated checkpoint metadata {path}: {err}") from err
    if not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"checkpoint metadata {path} has no storage index (not a distributed checkpoint)")
    return metadata


class _Window(io.RawIOBase):
    """Read-only view of ``length`` bytes at ``offset`` of an open file (one ``.distcp`` item)."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _refuse_pickled_code(path: Path, err: Exception, what: str) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}{what}: it holds pickled objects other than tensors and plain data "
        f"(it could run code; checkpoints are only read with weights_only=True): {err}"
    )


def _torch_load_checked(source: Any, path: Path, what: str = "", extra_globals: tuple = ()) -> Any:
    """``torch.load(weights_only=True, map_location="meta")`` with errors naming ``path``."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(source, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "not an allowed global" in str(err):
            raise _refuse_pickled_code(path, err, what) from err
        raise CheckpointError(f"corrupted or truncated checkpoint file {path}{what}: {err}") from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError, ...
        raise CheckpointError(f"corrupted or truncated checkpoint file {path}{what}: {err}") from err


def check_dcp_checkpoint(dcp_dir: Path) -> None:
    """Checks a ``torch.distributed.checkpoint`` folder before OLMo-core reads it: the
    ``.metadata`` index (allow-list unpickler) and every item of every ``.distcp`` file it
    points at (``weights_only=True``). Raises :class:`CheckpointError` naming the file."""
    dcp_dir = Path(dcp_dir)
    metadata = check_dcp_metadata(dcp_dir)
    by_file: dict[str, list[tuple[str, int, int]]] = {}
    for index, info in metadata.storage_data.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(rel, str) and isinstance(offset, int) and isinstance(length, int)):
            raise CheckpointError(f"checkpoint metadata {dcp_dir / '.metadata'} has a malformed storage entry")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"checkpoint metadata {dcp_dir / '.metadata'} points outside the folder: {rel!r}")
        by_file.setdefault(rel, []).append((getattr(index, "fqn", "?"), offset, length))
    for rel, items in sorted(by_file.items()):
        path = dcp_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {dcp_dir / '.metadata'})")
        size = path.stat().st_size
        with open(path, "rb") as f:
            for fqn, offset, length in items:
                if offset < 0 or length < 0 or offset + length > size:
                    raise CheckpointError(
                        f"checkpoint file {path} is truncated: item {fqn!r} needs bytes "
                        f"{offset}..{offset + length}, the file has {size}"
                    )
                _torch_load_checked(io.BufferedReader(_Window(f, offset, length)), path, f" (item {fqn!r})")


def _numpy_rng_globals() -> tuple:
    """The numpy classes a saved ``numpy.random`` state needs (plain arrays and dtypes)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    dtypes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return (np.ndarray, np.dtype, _reconstruct, *dtypes)


def check_trainer_state(path: Path) -> None:
    """Opens an OLMo-core trainer state file (``train/rank*.pt``) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer state {path} does not exist")
    state = _torch_load_checked(str(path), path, extra_globals=_numpy_rng_globals())
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state {path} is not a dict (corrupted?)")


def check_train_checkpoint(step_dir: Path) -> None:
    """Checks every pickle stream OLMo-core reads when it resumes from ``step_dir``: the
    trainer states ``train/rank*.pt`` and the ``model_and_optim`` distributed checkpoint
    (or a bare one in ``step_dir``). Raises :class:`CheckpointError` naming the file."""
    step_dir = Path(step_dir)
    for state in sorted((step_dir / "train").glob("rank*.pt")):
        check_trainer_state(state)
    if (step_dir / ".metadata").is_file():
        check_dcp_checkpoint(step_dir)
    if (step_dir / "model_and_optim").is_dir() or not (step_dir / ".metadata").is_file():
        check_dcp_checkpoint(step_dir / "model_and_optim")
    info = step_dir / ".metadata.json"
    if info.is_file():
        read_json(info)


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


def check_output_dir(source: str | Path, out_dir: str | Path) -> None:
    """Refuses an output folder that is the input, inside it, or holds it (writing there would
    overwrite the input's weights or config)."""
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    src_dir = src if src.is_dir() else src.parent
    if out == src_dir or src_dir in out.parents or out in src_dir.parents:
        raise CheckpointError(
            f"output folder {out_dir} overlaps the input {source} (the same folder, or one inside the "
            "other): writing there would overwrite the input; choose another output folder"
        )


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

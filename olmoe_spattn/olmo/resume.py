"""What a save folder holds, and whether a run may resume from it.

Before OLMo-core's trainer looks at ``train.save_folder`` (it resumes from the newest
complete ``stepN`` folder there, and starts from step 0 when it finds none),
:func:`prepare_save_folder`:

* refuses a folder whose step folders cannot be read (none complete, or the newest one
  incomplete): starting over would overwrite them;
* refuses a folder that belongs to a run of another attention (pattern, partition length)
  or model shape: the run's identity is recorded in ``olmoe-spattn-run.json`` (older
  folders: the ``recipe`` section of the newest step's ``config.json``);
* opens every pickle stream of the step folder it will resume from with a restricted
  unpickler / ``weights_only=True`` (:func:`~olmoe_spattn.hf.checkpoint_io.check_train_checkpoint`),
  so OLMo-core's own ``weights_only=False`` loads never meet pickled code.

``overwrite=True`` deletes the folder's checkpoints, metrics and record first (a new run);
``allow_attention_change=True`` resumes a checkpoint under a different attention on purpose
(the model shape must still match: the weights are the same tensors).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..hf.checkpoint_io import CheckpointError, check_train_checkpoint
from .recipe import Recipe

log = logging.getLogger(__name__)

RUN_RECORD = "olmoe-spattn-run.json"
_STEP_DIR = re.compile(r"^step(\d+)(-tmp)?$")
#: model keys that fix the weight shapes (a checkpoint of another shape cannot be loaded)
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden_size")
_HOW_TO_START_OVER = (
    "start a new run with --set train.save_folder=NEW_FOLDER, or pass --overwrite to delete this "
    "folder's checkpoints and start over"
)


def run_identity(recipe: Recipe) -> dict[str, Any]:
    """Attention (pattern, partition length) and model shape of ``recipe``."""
    dense = recipe.attention == "dense"
    return {
        "attention": recipe.attention,
        "partition_len": None if dense else recipe.resolved_partition_len,
        "model": {k: getattr(recipe.model, k) for k in SHAPE_KEYS},
    }


def _identity_from_recipe_dict(data: dict[str, Any]) -> dict[str, Any] | None:
    try:
        attention = data["attention"]
        model = {k: data["model"][k] for k in SHAPE_KEYS}
        partition_len = data.get("partition_len")
        if partition_len is None:
            partition_len = data["train"]["sequence_length"]
    except (KeyError, TypeError):
        return None
    return {"attention": attention, "partition_len": None if attention == "dense" else partition_len, "model": model}


def step_folders(save_folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``stepN`` folder (not the ``-tmp`` ones), by step."""
    # not Checkpointer.find_checkpoints: it skips incomplete folders, which must be seen to be refused
    if not save_folder.is_dir():
        return []
    found = []
    for p in save_folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and not m.group(2) and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def missing_checkpoint_files(step_dir: Path) -> list[str]:
    """Files OLMo-core needs to resume from ``step_dir`` that are absent (empty = complete)."""
    # Checkpointer.dir_is_checkpoint's rule; it answers only yes/no, and the error names the files
    if (step_dir / ".metadata").is_file():  # a bare model (+optim) checkpoint
        return []
    need = ("train/rank0.pt", "model_and_optim/.metadata", ".metadata.json")
    return [name for name in need if not (step_dir / name).is_file()]


def recorded_identity(save_folder: Path, latest: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The identity the folder's run recorded, and the file it came from."""
    record = save_folder / RUN_RECORD
    if record.is_file():
        try:
            return json.loads(record.read_text())["identity"], record
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"corrupted run record {record}: {err}") from err
    if latest is not None and (latest / "config.json").is_file():
        try:
            saved = json.loads((latest / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"corrupted run config {latest / 'config.json'}: {err}") from err
        recipe = saved.get("recipe") if isinstance(saved, dict) else None
        if isinstance(recipe, dict):
            return _identity_from_recipe_dict(recipe), latest / "config.json"
    return None, None


def _describe(identity: dict[str, Any]) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in identity["model"].items())
    return f"attention={identity['attention']}, partition_len={identity['partition_len']}, model({shape})"


def _check_identity(save_folder: Path, latest: Path | None, new: dict[str, Any], allow_attention_change: bool) -> None:
    old, source = recorded_identity(save_folder, latest)
    if old is None or old == new:
        return
    if old.get("model") != new["model"]:
        raise ValueError(
            f"train.save_folder {save_folder} holds a run of another model shape ({_describe(old)}, from "
            f"{source}); this recipe has {_describe(new)}. Its checkpoints cannot be resumed: {_HOW_TO_START_OVER}"
        )
    if allow_attention_change:
        log.warning("resuming %s (%s) with %s on purpose (--allow-attention-change)", save_folder, _describe(old), _describe(new))
        return
    raise ValueError(
        f"train.save_folder {save_folder} holds a run with attention={old['attention']}, "
        f"partition_len={old['partition_len']} (from {source}); this recipe asks for "
        f"attention={new['attention']}, partition_len={new['partition_len']}. Resuming would train those "
        f"weights under another attention. To {_HOW_TO_START_OVER}; or, to continue these checkpoints "
        "under the new attention on purpose, pass --allow-attention-change"
    )


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start_over(save_folder: Path) -> None:
    """Deletes the run files of ``save_folder`` (step folders, metrics, run record); keeps the
    dataset cache. Rank 0 only."""
    from .train import METRICS_FILE

    if not _is_rank0() or not save_folder.is_dir():
        return
    for p in save_folder.iterdir():
        if _STEP_DIR.match(p.name) and p.is_dir():
            log.warning("--overwrite: deleting %s", p)
            shutil.rmtree(p)
        elif p.name in (METRICS_FILE, RUN_RECORD):
            p.unlink()


def write_record(save_folder: Path, identity: dict[str, Any]) -> None:
    """Writes ``olmoe-spattn-run.json`` (rank 0; atomically)."""
    if not _is_rank0():
        return
    save_folder.mkdir(parents=True, exist_ok=True)
    tmp = save_folder / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps({"identity": identity}, indent=2) + "\n")
    tmp.replace(save_folder / RUN_RECORD)


def prepare_save_folder(
    recipe: Recipe, *, overwrite: bool = False, allow_attention_change: bool = False
) -> Path | None:
    """Checks (or, with ``overwrite``, clears) ``train.save_folder`` before training.

    Returns the step folder the trainer will resume from (already checked for pickled code
    and damage), or ``None`` for a fresh start. Raises ``ValueError`` (:class:`CheckpointError`
    for unreadable files) saying what is wrong and how to proceed. Every rank runs the
    checks; only rank 0 deletes or writes (callers put a barrier after).
    """
    save_folder = Path(recipe.train.save_folder).resolve()
    identity = run_identity(recipe)
    if overwrite:
        start_over(save_folder)
        write_record(save_folder, identity)
        return None
    steps = step_folders(save_folder)
    complete = [(s, p) for s, p in steps if not missing_checkpoint_files(p)]
    latest = complete[-1][1] if complete else None
    unreadable = [(s, p) for s, p in steps if latest is None or s > complete[-1][0]]
    unreadable = [(s, p) for s, p in unreadable if missing_checkpoint_files(p)]
    if unreadable:
        what = "; ".join(f"{p.name} lacks {', '.join(missing_checkpoint_files(p))}" for _, p in unreadable)
        where = "none of its step folders is a complete checkpoint" if latest is None else (
            f"step folder(s) newer than the latest complete checkpoint {latest.name} cannot be read")
        raise CheckpointError(
            f"train.save_folder {save_folder}: {where} ({what}). Training would overwrite them. Repair or move "
            f"them away to resume{'' if latest is None else f' from {latest.name}'}, or {_HOW_TO_START_OVER}"
        )
    _check_identity(save_folder, latest, identity, allow_attention_change)
    if latest is not None:
        try:
            check_train_checkpoint(latest)
        except CheckpointError as err:
            raise CheckpointError(
                f"cannot resume from {latest}: {err}. Move {latest.name} away to resume from an earlier "
                f"step, or {_HOW_TO_START_OVER}"
            ) from err
        log.info("resuming from %s (checked: no pickled code, no truncated files)", latest)
    record = save_folder / RUN_RECORD
    if allow_attention_change or not record.is_file():
        write_record(save_folder, identity)
    return latest

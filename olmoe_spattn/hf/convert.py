"""``convert to-hf`` / ``convert from-hf``: OLMo-core checkpoints <-> HF directories.

Weights go through OLMo-core's own converter (:mod:`olmoe_spattn.hf.state`). A band HF
directory written here (``--format spattn``) holds ``model.safetensors`` (transformers'
per-expert on-disk names), ``config.json`` (model_type ``olmoe_spattn``, or
``olmoe_spattn_prenorm`` for the pre-norm architecture of released OLMoE, with
``attention_pattern``, ``partition_len``, ``band_n_heads``), the tokenizer files, a
``README.md`` saying how to load it, and two tiny modules for ``trust_remote_code=True``
users whose only content is an import of this package (so plain ``lm_eval --model hf``
works, and without the package installed transformers stops with "requires ...
olmoe_spattn"). ``--format olmoe`` / ``flex_olmo`` write a stock transformers directory of a
dense model (no package needed to load it).

``from-hf`` reads stock ``olmoe`` (e.g. allenai/OLMoE-1B-7B-0924) and ``flex_olmo``
directories as well as ours, optionally switching the attention.

An OLMo-core checkpoint is either a training step folder (``config.json`` with the
experiment config plus ``model_and_optim/`` in ``torch.distributed.checkpoint``
format) or an unsharded one (``model.safetensors`` or a ``weights_only`` ``.pt`` file,
with the experiment ``config.json`` beside it). ``from-hf`` writes the unsharded form plus
the same weights as ``model_and_optim/`` (weights only, ``torch.distributed.checkpoint``),
which a recipe's ``train.load_path`` starts from.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bands import BandSpec
from .checkpoint_io import (
    CheckpointError,
    check_dcp_checkpoint,
    check_output_dir,
    read_hf_weights,
    read_json,
    read_safetensors,
    read_torch_weights,
)
from .config_map import (
    band_spec_of_model_config,
    hf_config_from_olmo_core,
    moe_shape_of,
    moe_shape_of_hf,
    olmo_core_config_from_hf,
)
from .configuration import (
    HOW_TO_LOAD,
    MODEL_TYPE,
    MODEL_TYPE_PRENORM,
    OlmoeSpattnConfig,
    OlmoeSpattnPrenormConfig,
)
from .state import hf_to_olmo_core, olmo_core_to_hf

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
_SHIM = '''"""Loads an olmoe-spattn band-attention checkpoint; needs `pip install olmoe-spattn`."""
try:
    from olmoe_spattn.hf import {names}  # noqa: F401
except ImportError as err:
    raise ImportError(
        "This is an olmoe-spattn (SPAttention band attention) checkpoint: install the package "
        "(`pip install olmoe-spattn`) and `import olmoe_spattn.hf` before loading it; "
        "it must never run as dense OLMoE/FlexOlmo attention."
    ) from err
'''
_SHIM_CONFIG = _SHIM.replace("{names}", "OlmoeSpattnConfig")
_SHIM_MODEL = _SHIM.replace("{names}", "OlmoeSpattnForCausalLM, OlmoeSpattnModel")
AUTO_MAP = {
    "AutoConfig": "configuration_olmoe_spattn.OlmoeSpattnConfig",
    "AutoModel": "modeling_olmoe_spattn.OlmoeSpattnModel",
    "AutoModelForCausalLM": "modeling_olmoe_spattn.OlmoeSpattnForCausalLM",
}
AUTO_MAP_PRENORM = {k: v.replace("OlmoeSpattn", "OlmoeSpattnPrenorm") for k, v in AUTO_MAP.items()}
_SHIM_MODEL_PRENORM = _SHIM.replace("{names}", "OlmoeSpattnPrenormForCausalLM, OlmoeSpattnPrenormModel")
_SHIM_CONFIG_PRENORM = _SHIM.replace("{names}", "OlmoeSpattnPrenormConfig")
#: HF model types ``from-hf`` reads.
HF_MODEL_TYPES = (MODEL_TYPE, MODEL_TYPE_PRENORM, "olmoe", "flex_olmo")

log = logging.getLogger(__name__)


@dataclass
class OlmoCoreCheckpoint:
    """An OLMo-core model: its config, its flat state dict, and the experiment config."""

    model_config: Any
    state: dict[str, torch.Tensor]
    experiment: dict[str, Any]
    source_dir: Path


def _import_integration() -> None:
    """Registers our OLMo-core attention config classes (needed by ``from_dict``)."""
    try:
        import olmoe_spattn.olmo  # noqa: F401
    except ImportError:
        pass


def model_config_from_experiment(experiment: dict[str, Any], where: Path) -> Any:
    """``TransformerConfig`` from an OLMo-core experiment (or bare model) config dict."""
    from olmo_core.nn.transformer import TransformerConfig

    _import_integration()
    model = experiment.get("model", None)
    if not isinstance(model, dict):
        raise CheckpointError(f"{where} has no 'model' section (not an OLMo-core experiment config)")
    model = {k: v for k, v in model.items() if k not in ("compile", "dp_config", "tp_config", "float8_config")}
    try:
        return TransformerConfig.from_dict(model)
    except Exception as err:  # noqa: BLE001 - olmo_core raises many types here
        raise CheckpointError(f"cannot read the model config in {where}: {err}") from err


def _locate(checkpoint: Path) -> tuple[str, Path, Path]:
    """``(kind, weights_path, config_path)`` with kind ``dcp`` | ``safetensors`` | ``torch``."""
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    if checkpoint.is_dir():
        if (checkpoint / "model_and_optim" / ".metadata").is_file():
            return "dcp", checkpoint / "model_and_optim", checkpoint / "config.json"
        if (checkpoint / ".metadata").is_file():
            return "dcp", checkpoint, checkpoint.parent / "config.json"
        if (checkpoint / "model.safetensors").is_file():
            return "safetensors", checkpoint / "model.safetensors", checkpoint / "config.json"
        for name in ("model.pt", "model.bin"):
            if (checkpoint / name).is_file():
                return "torch", checkpoint / name, checkpoint / "config.json"
        raise CheckpointError(
            f"{checkpoint} is not an OLMo-core checkpoint: expected model_and_optim/.metadata, "
            ".metadata, model.safetensors or model.pt"
        )
    kind = "safetensors" if checkpoint.suffix == ".safetensors" else "torch"
    return kind, checkpoint, checkpoint.parent / "config.json"


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def experiment_tokenizer_and_length(experiment: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Tokenizer settings and training sequence length from an experiment config.

    Looks where OLMo-core experiments (``dataset.tokenizer``, ``dataset.sequence_length``),
    this package's training recipes (``recipe.data.tokenizer``, ``recipe.train.sequence_length``)
    and ``convert from-hf`` (``tokenizer``) keep them.
    """
    tok = (
        _get(experiment, "dataset", "tokenizer")
        or _get(experiment, "recipe", "data", "tokenizer")
        or _get(experiment, "tokenizer")
        or {}
    )
    seq_len = _get(experiment, "dataset", "sequence_length") or _get(experiment, "recipe", "train", "sequence_length")
    return (tok if isinstance(tok, dict) else {}), (int(seq_len) if isinstance(seq_len, int) else None)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_olmo_core_checkpoint(checkpoint: str | Path, *, config_path: str | Path | None = None) -> OlmoCoreCheckpoint:
    """Reads an OLMo-core checkpoint (distributed or unsharded) onto the CPU."""
    checkpoint = Path(checkpoint)
    kind, weights, default_config = _locate(checkpoint)
    config_file = Path(config_path) if config_path is not None else default_config
    experiment = read_json(config_file)
    model_config = model_config_from_experiment(experiment, config_file)
    if kind == "safetensors":
        state = _strip_prefix(read_safetensors(weights))
    elif kind == "torch":
        state = _strip_prefix(read_torch_weights(weights))
    else:
        state = _load_dcp(weights, model_config)
    return OlmoCoreCheckpoint(model_config, state, experiment, config_file.parent)


def _load_dcp(dcp_dir: Path, model_config: Any) -> dict[str, torch.Tensor]:
    from olmo_core.distributed.checkpoint import load_model_and_optim_state

    check_dcp_checkpoint(dcp_dir)  # index and every .distcp item, before OLMo-core unpickles them
    model = model_config.build(init_device="meta")
    model.to_empty(device=torch.device("cpu"))
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            load_model_and_optim_state(dcp_dir, model, work_dir=work_dir)
    except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException, RuntimeError, ...
        raise CheckpointError(f"cannot read distributed checkpoint {dcp_dir} (corrupted or truncated?): {err}") from err
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ tokenizer
def _tokenizer_source(explicit: str | Path | None, checkpoint_dir: Path, identifier: Any = None) -> Path | None:
    """``--tokenizer``, else tokenizer files in the checkpoint, else a local directory named
    by the experiment's tokenizer ``identifier`` (hub names are not fetched)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise CheckpointError(f"tokenizer {path} does not exist")
        return path
    local = [Path(identifier)] if isinstance(identifier, str) and Path(identifier).is_dir() else []
    for candidate in (checkpoint_dir / "tokenizer", checkpoint_dir, *local):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def save_tokenizer(source: Path, out_dir: Path, token_ids: dict[str, int | None]) -> None:
    """Writes HF tokenizer files into ``out_dir`` from a directory or a ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    if source.is_dir() and (source / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out_dir / name)
        return
    file = source / "tokenizer.json" if source.is_dir() else source
    tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    for role in ("bos", "eos", "pad"):
        tid = token_ids.get(f"{role}_token_id")
        if tid is not None:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(int(tid)))
    tok.save_pretrained(str(out_dir))


# ------------------------------------------------------------------ HF directory
def _readme(config: OlmoeSpattnConfig) -> str:
    return (
        f"# olmoe-spattn checkpoint ({config.attention_pattern}, partition_len={config.partition_len})\n\n"
        f"model_type `{MODEL_TYPE}`: {HOW_TO_LOAD}.\n\n"
        "```python\nimport olmoe_spattn.hf  # registers the Auto classes and the band attention\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n"
    )


def write_hf_dir(
    out_dir: str | Path,
    config: Any,
    state: dict[str, torch.Tensor],
    *,
    max_shard_size: str = "5GB",
) -> Path:
    """Writes config, safetensors weights (sharded above ``max_shard_size``, with an index)
    and, for our band model types, the README and the import shims to ``out_dir``."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    band = isinstance(config, (OlmoeSpattnConfig, OlmoeSpattnPrenormConfig))
    if band:
        prenorm = isinstance(config, OlmoeSpattnPrenormConfig)
        config.auto_map = dict(AUTO_MAP_PRENORM if prenorm else AUTO_MAP)
        config.architectures = ["OlmoeSpattnPrenormForCausalLM" if prenorm else "OlmoeSpattnForCausalLM"]
    config.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if band:
        (out / "configuration_olmoe_spattn.py").write_text(_SHIM_CONFIG_PRENORM if prenorm else _SHIM_CONFIG)
        (out / "modeling_olmoe_spattn.py").write_text(_SHIM_MODEL_PRENORM if prenorm else _SHIM_MODEL)
        (out / "README.md").write_text(_readme(config))
    return out


def read_hf_config(model_dir: str | Path) -> Any:
    """The transformers config of a HF directory of a model type ``from-hf`` reads."""
    model_dir = Path(model_dir)
    raw = read_json(model_dir / "config.json")
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{model_dir} has model_type {model_type!r}; converted are: {', '.join(HF_MODEL_TYPES)} "
            "(released OLMoE checkpoints are 'olmoe')"
        )
    if model_type == MODEL_TYPE:
        return OlmoeSpattnConfig.from_pretrained(str(model_dir))
    if model_type == MODEL_TYPE_PRENORM:
        return OlmoeSpattnPrenormConfig.from_pretrained(str(model_dir))
    from transformers import FlexOlmoConfig, OlmoeConfig

    return (OlmoeConfig if model_type == "olmoe" else FlexOlmoConfig).from_pretrained(str(model_dir))


def read_hf_dir(model_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """Config and on-disk weights of a HF directory (ours, stock ``olmoe`` or ``flex_olmo``)."""
    config = read_hf_config(model_dir)
    return config, read_hf_weights(Path(model_dir))


# ------------------------------------------------------------------ both directions
def convert_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    config_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    fmt: str = "spattn",
) -> Path:
    """OLMo-core checkpoint -> HF directory; returns ``out_dir``.

    ``fmt``: ``spattn`` (band model types; loads after ``import olmoe_spattn.hf``), or the
    stock transformers ``olmoe`` / ``flex_olmo`` formats of a dense model.

    ``max_seq_len`` becomes ``max_position_embeddings`` (the context lm-eval and
    ``generate`` assume); default: the experiment's ``dataset.sequence_length``, else the
    partition length, else 4096.
    """
    check_output_dir(checkpoint, out_dir)
    from tqdm import tqdm

    bar = tqdm(total=4, desc="convert to-hf", unit="step", bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")
    bar.set_postfix_str("loading checkpoint")
    ckpt = load_olmo_core_checkpoint(checkpoint, config_path=config_path)
    bar.update()
    bar.set_postfix_str("renaming weights")
    tok_cfg, seq_len = experiment_tokenizer_and_length(ckpt.experiment)
    ids = {f"{r}_token_id": tok_cfg.get(f"{r}_token_id") for r in ("bos", "eos", "pad")}
    spec = band_spec_of_model_config(ckpt.model_config)
    if max_seq_len is None:
        max_seq_len = seq_len
    hf_config = hf_config_from_olmo_core(
        ckpt.model_config, spec=spec, fmt=fmt, max_position_embeddings=max_seq_len, **ids
    )
    state = olmo_core_to_hf(
        ckpt.state, hf_config, moe_shape_of(ckpt.model_config), expected_keys=_state_keys(ckpt.model_config)
    )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        hf_config.dtype = str(dtype).removeprefix("torch.")
    bar.update()
    bar.set_postfix_str("writing safetensors")
    out = write_hf_dir(out_dir, hf_config, state)
    bar.update()
    bar.set_postfix_str("tokenizer")
    source = _tokenizer_source(tokenizer, ckpt.source_dir, tok_cfg.get("identifier"))
    if source is not None:
        save_tokenizer(source, out, ids)
    else:
        log.warning("no tokenizer files found for %s; pass --tokenizer to include them", checkpoint)
    bar.update()
    bar.close()
    return out


def convert_from_hf(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    attention: str | None = None,
    partition_len: int | str | None = None,
    backend: str | None = None,
) -> Path:
    """HF directory -> OLMo-core checkpoint that training starts from.

    Writes ``model.safetensors`` + ``config.json`` (experiment config with the model) +
    ``model_and_optim/`` (the same weights as a weights-only distributed checkpoint, what
    ``train.load_path`` reads) + ``tokenizer/``. ``attention`` switches the attention (the
    weights do not depend on it); a band pattern on a dense source needs ``partition_len``.
    """
    from olmo_core.distributed.checkpoint import save_state_dict
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    check_output_dir(model_dir, out_dir)
    config, hf_state = read_hf_dir(model_dir)
    model_config = olmo_core_config_from_hf(config, attention=attention, partition_len=partition_len, backend=backend)
    state = hf_to_olmo_core(hf_state, config, moe_shape_of_hf(config), expected_keys=_state_keys(model_config))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    dcp = out / "model_and_optim"
    if dcp.exists():
        shutil.rmtree(dcp)
    save_state_dict(str(dcp), {"model": state})
    tokenizer = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "vocab_size": config.vocab_size,
    }
    spec = band_spec_of_model_config(model_config)
    experiment = {"model": model_config.as_config_dict(), "tokenizer": tokenizer, "spattn": _spec_dict(spec),
                  "source": {"hf_dir": str(model_dir), "model_type": config.model_type}}
    (out / "config.json").write_text(json.dumps(experiment, indent=2, default=str))
    if (model_dir / "tokenizer.json").is_file():
        tok_dir = out / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tok_dir / name)
    return out


def _state_keys(model_config: Any) -> set[str]:
    """State-dict keys of the model ``model_config`` builds (built on the meta device)."""
    with torch.device("meta"):
        return set(model_config.build(init_device="meta").state_dict())


def _spec_dict(spec: BandSpec) -> dict[str, object]:
    return spec.to_dict()

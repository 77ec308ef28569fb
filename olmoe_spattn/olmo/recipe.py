"""YAML training recipes: schema, validation, ``--set`` overrides, and the OLMo-core model config.

A recipe is a YAML mapping with these top-level keys (``configs/*.yaml`` are examples)::

    name: tiny                    # free text
    description: ...              # free text
    attention: spattention        # dense | spattention | exclusive_bands | gapped_bands | sliding_window
    partition_len: null           # null = train.sequence_length; an int >= n_heads; or "dynamic"
    attention_backend: auto       # auto | triton | fa4 | flex | torch
    model:   {vocab_size, d_model, n_layers, n_heads, num_experts, top_k, expert_hidden_size,
              lb_loss_weight, z_loss_weight, rope_theta, block, layer_norm_eps}
    data:    {paths (files or globs), synthetic, synthetic_tokens, builtin_text, dtype, document_masking,
              work_dir, tokenizer: OLMo-core TokenizerConfig {vocab_size, eos_token_id, pad_token_id,
              bos_token_id, identifier}}
    train:   see :class:`TrainSection`

Each section is an OLMo-core ``Config`` dataclass: OLMo-core decodes the YAML and applies
``--set`` overrides. Relative paths are resolved against the current directory. Every key is
checked: an unknown key, a wrong type or a bad value raises ``ValueError`` naming it and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml
from dataclass_extensions import DecodeError, decode
from olmo_core.config import Config
from olmo_core.data.tokenizer import TokenizerConfig

from ..api import BACKENDS
from ..bands import DYNAMIC, PATTERNS

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # shipped as package data


@dataclass
class ModelSection(Config):
    """OLMoE architecture (OLMo-core ``olmoe_1B_7B`` blocks at any size)."""

    vocab_size: int = 50304
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    num_experts: int = 64
    top_k: int = 8
    expert_hidden_size: int = 1024
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    rope_theta: int = 500_000  # RoPE base; long-context recipes raise it (OLMo-core's ABF practice)
    # moe_reordered_norm: OLMo-core's OLMoE preset (norms after attention/MoE); moe: pre-norm,
    # the architecture of released OLMoE checkpoints (use with layer_norm_eps 1e-5 for those)
    block: Literal["moe_reordered_norm", "moe"] = "moe_reordered_norm"
    layer_norm_eps: float = 1e-6


@dataclass
class DataSection(Config):
    """OLMo-core numpy token files (raw ``np.memmap`` arrays of token IDs)."""

    paths: list[str] = field(default_factory=list)
    synthetic: bool = False
    synthetic_tokens: int = 500_000
    # write data.paths[0] from the package's own short English text, tokenized with the tiny
    # tokenizer built into the local directory data.tokenizer.identifier (see data.tiny_text)
    builtin_text: bool = False
    # OLMo-core's own tokenizer record; the defaults are its gpt-neox-olmo-dolma-v1_5 tokenizer
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig.gpt_neox_olmo_dolma_v1_5)
    # token dtype of the files; null = inferred from vocab_size
    dtype: Literal[None, "uint8", "uint16", "uint32", "uint64"] = None
    document_masking: bool = False  # attend only within each document (EOS-separated), varlen
    work_dir: Union[str, None] = None


@dataclass
class TrainSection(Config):
    """Optimisation, schedule, parallelism, checkpointing and logging."""

    sequence_length: int = 4096
    global_batch_size: int = 1024  # sequences per optimizer step, all ranks together
    rank_microbatch_size: int = 4  # sequences per forward/backward on one rank
    max_steps: int = 1000
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    scheduler: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 2000
    decay_fraction: float = 0.1  # wsd only
    max_grad_norm: Union[float, None] = 1.0  # null = no gradient clipping
    seed: int = 42
    save_folder: str = "runs/olmoe"
    # Start weights (continued pretraining): an OLMo-core checkpoint folder (a training step
    # folder, its model_and_optim/, or a `convert from-hf` output). Only the model weights are
    # read (fresh optimizer, step 0); ignored once save_folder holds a checkpoint (resume).
    load_path: Union[str, None] = None
    save_interval: int = 1000
    ephemeral_save_interval: Union[int, None] = None
    save_checkpoints: bool = True  # false: no checkpoints at all, not even the final one (benchmarks)
    log_interval: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal[None, "bfloat16"] = None
    param_dtype: Literal[None, "bfloat16"] = None  # FSDP/HSDP mixed precision
    compile: bool = False
    activation_checkpointing: Union[str, None] = None  # null | attention | selected_ops
    data_parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    expert_parallel_degree: int = 1
    tensor_parallel_degree: int = 1
    context_parallel_degree: int = 1
    num_workers: int = 0
    moe_matmul: Literal["auto", "grouped_mm", "olmo-core"] = "auto"  # see olmoe_spattn.olmo.moe_grouped
    wandb: bool = False
    wandb_project: str = "olmoe-spattn"
    wandb_entity: Union[str, None] = None


#: null | attention (OLMo-core selected_modules on every attention layer) | selected_ops
AC_MODES = (None, "attention", "selected_ops")


@dataclass
class Recipe(Config):
    """A validated training recipe."""

    name: str = "olmoe"
    description: str = ""
    attention: str = "spattention"
    partition_len: Union[int, str, None] = None
    attention_backend: str = "auto"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    source: Union[str, None] = field(default=None, init=False)  # the file it came from (not a YAML key)

    # ------------------------------------------------------------------ derived values
    @property
    def resolved_partition_len(self) -> Union[int, str]:
        """``partition_len``, defaulting to the training sequence length."""
        return self.train.sequence_length if self.partition_len is None else self.partition_len

    def model_config(self):
        """The OLMo-core ``TransformerConfig`` this recipe trains."""
        from .model import olmoe_config

        m = self.model
        return olmoe_config(
            vocab_size=m.vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            num_experts=m.num_experts,
            top_k=m.top_k,
            expert_hidden_size=m.expert_hidden_size,
            attention=self.attention,
            partition_len=None if self.attention == "dense" else self.resolved_partition_len,
            backend=self.attention_backend,
            lb_loss_weight=m.lb_loss_weight,
            z_loss_weight=m.z_loss_weight,
            rope_theta=m.rope_theta,
            block=m.block,
            layer_norm_eps=m.layer_norm_eps,
        )

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` with the offending key and allowed values."""
        _choice("attention", self.attention, PATTERNS)
        _choice("attention_backend", self.attention_backend, BACKENDS)
        if self.partition_len is not None and self.partition_len != DYNAMIC:
            if isinstance(self.partition_len, str) or self.partition_len < self.model.n_heads:
                raise ValueError(
                    f"partition_len={self.partition_len!r} must be null, {DYNAMIC!r} or an int >= "
                    f"model.n_heads={self.model.n_heads}"
                )
        m, t, d = self.model, self.train, self.data
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden_size",
                    "rope_theta"):
            _positive(f"model.{key}", getattr(m, key))
        if not m.layer_norm_eps > 0:
            raise ValueError(f"model.layer_norm_eps must be positive, got {m.layer_norm_eps}")
        if m.d_model % m.n_heads:
            raise ValueError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
        if m.top_k > m.num_experts:
            raise ValueError(f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}")
        if d.tokenizer.vocab_size > m.vocab_size:
            raise ValueError(
                f"data.tokenizer.vocab_size={d.tokenizer.vocab_size} exceeds model.vocab_size={m.vocab_size}"
            )
        for key in ("eos_token_id", "pad_token_id"):
            value = getattr(d.tokenizer, key)
            if not 0 <= value < d.tokenizer.vocab_size:
                raise ValueError(f"data.tokenizer.{key}={value} is outside [0, {d.tokenizer.vocab_size})")
        if not d.paths:
            raise ValueError("data.paths is empty: list the numpy token files to train on")
        if d.builtin_text and (d.synthetic or len(d.paths) != 1 or not d.tokenizer.identifier):
            raise ValueError(
                "data.builtin_text=true needs exactly one data.paths entry, data.synthetic=false and "
                "data.tokenizer.identifier set to the local directory the tokenizer is written to; got "
                f"paths={d.paths}, synthetic={d.synthetic}, identifier={d.tokenizer.identifier!r}"
            )
        for key in ("sequence_length", "global_batch_size", "rank_microbatch_size", "max_steps",
                    "save_interval", "log_interval", "expert_parallel_degree",
                    "tensor_parallel_degree", "context_parallel_degree"):
            _positive(f"train.{key}", getattr(t, key))
        if t.global_batch_size % t.rank_microbatch_size:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"train.rank_microbatch_size={t.rank_microbatch_size}"
            )
        self._check_ranges()
        if t.activation_checkpointing in ("full", "selected_blocks"):
            raise ValueError(
                f"train.activation_checkpointing={t.activation_checkpointing!r}: OLMo-core cannot "
                "checkpoint whole MoE blocks; use 'attention' (checkpoints every attention layer) "
                "or 'selected_ops'"
            )
        _choice("train.activation_checkpointing", t.activation_checkpointing, AC_MODES)
        if t.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("train.wandb=true needs the wandb package: pip install wandb")
        if t.context_parallel_degree > 1 and self.attention != "dense":
            raise ValueError(
                f"train.context_parallel_degree={t.context_parallel_degree}: context parallelism is "
                f"not supported with band attention ({self.attention!r}); use 1 or attention: dense"
            )


    def _check_ranges(self) -> None:
        """Every numeric hyperparameter within its range (NaN and infinities refused)."""
        m, t, d = self.model, self.train, self.data
        _number("model.lb_loss_weight", m.lb_loss_weight, low=0.0)
        _number("model.z_loss_weight", m.z_loss_weight, low=0.0)
        _positive("data.synthetic_tokens", d.synthetic_tokens)
        if d.tokenizer.bos_token_id is not None and not 0 <= d.tokenizer.bos_token_id < d.tokenizer.vocab_size:
            raise ValueError(
                f"data.tokenizer.bos_token_id={d.tokenizer.bos_token_id} is outside [0, {d.tokenizer.vocab_size}) or null"
            )
        _number("train.lr", t.lr, low=0.0, low_open=True)
        _number("train.min_lr_ratio", t.min_lr_ratio, low=0.0, high=1.0)
        _number("train.weight_decay", t.weight_decay, low=0.0)
        if len(t.betas) != 2:
            raise ValueError(f"train.betas={t.betas} must be two numbers in [0, 1)")
        for i, b in enumerate(t.betas):
            _number(f"train.betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        _number("train.eps", t.eps, low=0.0, low_open=True)
        _number("train.decay_fraction", t.decay_fraction, low=0.0, high=1.0)
        _number("train.max_grad_norm", t.max_grad_norm, low=0.0, low_open=True, allow_none=True)
        _number("train.warmup_steps", t.warmup_steps, low=0)
        _number("train.seed", t.seed, low=0)
        _number("train.num_workers", t.num_workers, low=0)
        _number("train.ephemeral_save_interval", t.ephemeral_save_interval, low=1, allow_none=True)


def _number(
    key: str,
    value: float | int | None,
    *,
    low: float | int,
    high: float | int | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raises ``ValueError`` naming ``key``, ``value`` and the allowed range unless ``value`` is a
    finite number in it (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        kind = "an integer" if isinstance(low, int) and not isinstance(low, bool) else "a finite number"
        none = ", or null" if allow_none else ""
        raise ValueError(f"{key}={value!r} is out of range; allowed: {kind} {lo}{hi}{none}")


def _not_allowed(key: str, value: object, allowed: tuple) -> str:
    names = ", ".join("null" if a is None else str(a) for a in allowed)
    return f"{key}={value!r} is not allowed; choose one of: {names}"


def _choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(_not_allowed(key, value, allowed))


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value!r} is out of range; allowed: a positive integer (>= 1)")


# ---------------------------------------------------------------------- YAML -> Recipe
# OLMo-core decodes the recipe (``Config.from_dict``) and applies ``key.path=value`` overrides
# (``Config.merge``, values parsed as YAML). Each key is checked first because OLMo-core's own
# errors name a whole section, and a ``_CLASS_`` key in a recipe would name a class to import.
def _check(cls: type, data: object, prefix: str = "", *, partial: bool = False) -> None:
    """Raises ``ValueError`` naming the key for a non-mapping section, an unknown key (with the
    allowed ones), a missing required key (unless ``partial``: an override) or a value OLMo-core's
    decoder cannot coerce to the field's type."""
    where = prefix or "the recipe"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = sorted(map(str, set(data) - set(names)))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {', '.join(names)}")
    required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing and not partial:
        raise ValueError(f"{where} is missing key(s) {missing}; required: {', '.join(required)}")
    hints = get_type_hints(cls)
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            _check(hints[name], value, key, partial=partial)
            continue
        try:  # the one field alone, as OLMo-core's decoder coerces it (which takes true for 1)
            if isinstance(value, bool) and bool not in get_args(hints[name]) + (hints[name],):
                raise DecodeError(f"{value} is not a number")
            decode(dataclasses.make_dataclass(name, [(name, hints[name])]), {name: value})
        except DecodeError as err:
            hint = hints[name]
            if get_origin(hint) is Literal:
                raise ValueError(_not_allowed(key, value, get_args(hint))) from err
            expected = hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")
            raise ValueError(f"{key}={value!r} has the wrong type; expected {expected}") from err


def recipe_from_dict(data: dict, overrides: tuple[str, ...] | list[str] = (), source: str | None = None) -> Recipe:
    """Validates ``data`` (after applying ``key.path=value`` overrides) into a :class:`Recipe`."""
    _check(Recipe, data)
    for assignment in overrides:
        path, eq, raw = assignment.partition("=")
        if not eq:
            raise ValueError(f"override {assignment!r} must look like key.path=value")
        value = yaml.safe_load(raw) if raw.strip() else ""  # the key and value Config.merge sets
        for key in reversed(path.strip(" -").replace("-", "_").split(".")):
            value = {key: value}
        _check(Recipe, value, partial=True)
    recipe = Recipe.from_dict(data).merge(list(overrides))
    recipe.source = source
    recipe.validate()
    return recipe


def resolve_recipe_path(path: str | Path) -> Path:
    """``path`` as given, or a bundled recipe name such as ``tiny`` (``configs/tiny.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = RECIPES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if bundled.is_file():
        return bundled
    if p.exists():
        raise ValueError(f"recipe {str(path)!r} is not a file (a YAML recipe or a bundled recipe name is expected)")
    available = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ValueError(f"recipe {str(path)!r} not found; bundled recipes: {', '.join(available) or 'none'}")


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Reads a YAML recipe (``yaml.safe_load``), applies ``key.path=value`` overrides, validates."""
    p = resolve_recipe_path(path)
    # not Config.from_yaml: the keys are checked (_check) before OLMo-core decodes them
    with open(p, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    return recipe_from_dict(data, overrides, source=str(p))

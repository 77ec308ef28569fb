"""Training with OLMo-core's own trainer, train module, checkpointer, callbacks and numpy data.

:func:`train` turns a :class:`~olmoe_spattn.olmo.recipe.Recipe` into OLMo-core objects
(``TransformerTrainModuleConfig``, ``NumpyFSLDatasetConfig``, ``NumpyDataLoaderConfig``,
``TrainerConfig`` with checkpointer / speed-monitor / console / W&B callbacks) and runs
``Trainer.fit()``. Checkpoints go to ``train.save_folder``; running the same command again
resumes from the latest checkpoint there (model, optimizer, data-loader position, step),
after :func:`~olmoe_spattn.olmo.resume.prepare_save_folder` has checked that the folder
belongs to this run (attention, model shape) and that its files hold no pickled code.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .recipe import Recipe

log = logging.getLogger(__name__)

#: Testing aid: SIGKILL the process right after this step (simulates a crash for resume tests).
CRASH_ENV = "OLMOE_SPATTN_CRASH_AT_STEP"
METRICS_FILE = "metrics.jsonl"


def resolve_device(recipe: Recipe) -> torch.device:
    """``train.device`` with ``auto`` mapped to CUDA when available, else CPU."""
    name = recipe.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def world_size() -> int:
    """Number of processes (``WORLD_SIZE`` set by torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parameter_counts(recipe: Recipe) -> dict[str, int]:
    """Total / active parameter counts, with and without the embedding and LM-head matrices."""
    config = recipe.model_config()
    vocab_params = config.d_model * config.vocab_size  # one of embedding / LM head
    return {
        "total": config.num_params,
        "active": config.num_active_params,
        "total_non_embedding": config.num_params - 2 * vocab_params,
        "active_non_embedding": config.num_active_params - 2 * vocab_params,
    }


def layer_patterns(recipe: Recipe) -> list[str]:
    """One line per layer: its attention pattern and band widths/starts."""
    from .model import band_specs_by_layer

    lines = []
    seq = recipe.train.sequence_length
    for i, spec in enumerate(band_specs_by_layer(recipe.model_config())):
        if spec is None:
            lines.append(f"layer {i:2d}: dense causal")
            continue
        widths, starts = spec.widths(seq), spec.starts(seq)
        cov = sum(spec.covered_pairs(seq)) / (spec.n_heads * seq * (seq + 1) / 2)
        lines.append(
            f"layer {i:2d}: {spec.pattern} N={spec.partition_len} widths={_short(widths)} "
            f"starts={_short(starts)} pairs={cov:.1%} of dense"
        )
    return lines


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:4]))}, ..., {values[-1]}]"


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.3f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def describe(recipe: Recipe) -> str:
    """The ``--dry-run`` report: resolved recipe, parameter counts and per-layer patterns."""
    import yaml

    from .memory import report as memory_report

    counts = parameter_counts(recipe)
    t = recipe.train
    tokens_per_step = t.global_batch_size * t.sequence_length
    lines = [
        f"# recipe: {recipe.source or recipe.name}",
        yaml.safe_dump(recipe.as_dict(), sort_keys=False).rstrip(),
        "",
        "# parameters",
        f"total:  {_count(counts['total'])}; without embedding/LM head {_count(counts['total_non_embedding'])}",
        f"active: {_count(counts['active'])}; without embedding/LM head {_count(counts['active_non_embedding'])}",
        f"attention: {recipe.attention}, partition_len: {recipe.resolved_partition_len}, "
        f"backend: {recipe.attention_backend}",
        f"tokens per step: {tokens_per_step:,}; total tokens: {tokens_per_step * t.max_steps:,}",
        "",
        "# attention pattern per layer",
        *layer_patterns(recipe),
        "",
        "# memory estimate (olmoe_spattn.olmo.memory: FSDP-sharded model states + activations + logits)",
        *memory_report(recipe),
    ]
    return "\n".join(lines)


def ensure_data(recipe: Recipe) -> list[str]:
    """Checks the token files exist; writes synthetic ones first when ``data.synthetic`` is set,
    or the built-in text's tokens and tokenizer when ``data.builtin_text`` is set."""
    from ..data.synthetic import write_synthetic_tokens
    from .tokenizer_files import ensure_builtin_text

    if recipe.data.builtin_text:
        return ensure_builtin_text(recipe)
    paths: list[str] = []
    for p in recipe.data.paths:
        if any(c in p for c in "*?["):
            matches = sorted(glob.glob(p))
            if not matches:
                raise ValueError(f"data.paths: no files match {p!r}")
            paths.extend(matches)
        else:
            paths.append(str(Path(p)))
    missing = [p for p in paths if not Path(p).exists()]
    if missing and recipe.data.synthetic:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            tok = recipe.data.tokenizer
            for i, p in enumerate(missing):
                log.info("writing %s synthetic tokens to %s", f"{recipe.data.synthetic_tokens:,}", p)
                write_synthetic_tokens(
                    p, recipe.data.synthetic_tokens, tok.vocab_size, eos_token_id=tok.eos_token_id, seed=i
                )
        from olmo_core.distributed.utils import barrier

        barrier()
        missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(
            f"data file(s) not found: {', '.join(missing)}; create them with `olmoe-spattn "
            "prepare-data`, or set data.synthetic: true for a synthetic demo"
        )
    return paths


def resolve_load_path(load_path: str | None) -> str | None:
    """``train.load_path`` as a folder OLMo-core's trainer loads weights from.

    Accepts a training step folder (``model_and_optim/`` + ``train/``), a ``model_and_optim/``
    folder itself, a folder of step folders, or a ``convert from-hf`` output (whose
    ``model_and_optim/`` holds the weights only). Raises ``ValueError`` when none is there.
    """
    if load_path is None:
        return None
    path = Path(load_path)
    if (path / ".metadata").is_file() or (path / "train").is_dir():
        return str(path)
    if (path / "model_and_optim" / ".metadata").is_file():
        return str(path / "model_and_optim")  # weights-only checkpoint (convert from-hf)
    if path.is_dir() and any(p.is_dir() and p.name.startswith("step") for p in path.iterdir()):
        return str(path)  # OLMo-core picks the latest step folder
    raise ValueError(
        f"train.load_path={load_path!r} is not an OLMo-core checkpoint: expected a step folder, "
        "a model_and_optim/ folder, or the output of `olmoe-spattn convert from-hf`"
    )


def check_load_path_architecture(recipe: Recipe, load_path: str | None) -> None:
    """Raises ``ValueError`` when the checkpoint at ``load_path`` (its ``config.json``) holds a
    different architecture than the recipe builds (the weights would load but compute
    something else, e.g. a pre-norm OLMoE into reordered-norm blocks)."""
    if load_path is None:
        return
    path = Path(load_path)
    candidates = [path / "config.json", path.parent / "config.json", path.parent.parent / "config.json"]
    config_file = next((c for c in candidates if c.is_file()), None)
    if config_file is None:
        log.warning("no config.json found for train.load_path=%s; architecture not checked", load_path)
        return
    from ..hf.convert import model_config_from_experiment
    from .model import architecture_of

    theirs = architecture_of(model_config_from_experiment(json.loads(config_file.read_text()), config_file))
    ours = architecture_of(recipe.model_config())
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    if diff:
        keys = {"block": "model.block", "layer_norm_eps": "model.layer_norm_eps", "vocab_size": "model.vocab_size",
                "d_model": "model.d_model", "n_layers": "model.n_layers", "n_heads": "model.n_heads",
                "num_experts": "model.num_experts", "expert_hidden_size": "model.expert_hidden_size",
                "top_k": "model.top_k"}
        sets = " ".join(f"--set {keys[k]}={v[1]}" for k, v in diff.items() if k in keys)
        details = ", ".join(f"{k}: recipe {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"train.load_path={load_path!r} holds a different architecture ({details}); "
            f"match the recipe to it{': ' + sets if sets else ''}"
        )


def _callbacks(recipe: Recipe, save_folder: str) -> dict[str, Any]:
    from olmo_core.distributed.utils import get_rank
    from olmo_core.train.callbacks import (
        Callback,
        CheckpointerCallback,
        ConfigSaverCallback,
        ConsoleLoggerCallback,
        SpeedMonitorCallback,
        WandBCallback,
    )

    from .tokenizer_files import tokenizer_callbacks

    @dataclass
    class MetricsFileCallback(Callback):
        """Appends each step's metrics (loss, tokens/s, MFU, expert load) to ``metrics.jsonl``."""

        # not OLMo-core's MetricSaverCallback: it keeps only the latest step, and the run summary
        # and the benchmarks read every step

        path: str = ""

        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            if get_rank() != 0:
                return
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @dataclass
    class CrashCallback(Callback):
        """SIGKILLs the process after step ``at`` (tests resuming after a hard crash)."""

        at: int = 0

        def post_step(self) -> None:
            if self.step >= self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    t = recipe.train
    callbacks: dict[str, Any] = {
        "checkpointer": CheckpointerCallback(
            save_interval=t.save_interval,
            ephemeral_save_interval=t.ephemeral_save_interval,
            save_async=False,
            enabled=t.save_checkpoints,
        ),
        "speed_monitor": SpeedMonitorCallback(),
        "console_logger": ConsoleLoggerCallback(log_interval=t.log_interval),
        "config_saver": ConfigSaverCallback(),
        "metrics_file": MetricsFileCallback(path=str(Path(save_folder) / METRICS_FILE)),
    }
    if t.wandb:
        callbacks["wandb"] = WandBCallback(
            name=recipe.name, project=t.wandb_project, entity=t.wandb_entity, enabled=True
        )
    callbacks.update(tokenizer_callbacks(recipe))  # copy a local tokenizer into each checkpoint
    crash_at = os.environ.get(CRASH_ENV)
    if crash_at:
        callbacks["crash"] = CrashCallback(at=int(crash_at))
    return callbacks


def _train_module_config(recipe: Recipe, device: torch.device):
    from olmo_core.config import DType
    from olmo_core.optim import WSD, AdamWConfig, ConstantWithWarmup, CosWithWarmup, OptimGroupOverride
    from olmo_core.train.train_module import (
        TransformerDataParallelConfig,
        TransformerExpertParallelConfig,
        TransformerTensorParallelConfig,
        TransformerTrainModuleConfig,
    )

    t = recipe.train
    seq = t.sequence_length
    if t.scheduler == "cosine":
        scheduler = CosWithWarmup(warmup=t.warmup_steps, alpha_f=t.min_lr_ratio)
    elif t.scheduler == "wsd":
        scheduler = WSD(
            warmup=t.warmup_steps, decay_fraction=t.decay_fraction, decay_min_lr=t.lr * t.min_lr_ratio
        )
    else:
        scheduler = ConstantWithWarmup(warmup=t.warmup_steps)
    dp = None
    # FSDP/HSDP also on a single GPU, so that param_dtype (mixed precision) means the same at any
    # GPU count; a single CPU process trains unwrapped.
    if world_size() > 1 or (device.type == "cuda" and t.data_parallel != "ddp"):
        dp = TransformerDataParallelConfig(
            name=t.data_parallel,
            param_dtype=DType(t.param_dtype) if t.param_dtype else None,
            reduce_dtype=DType.float32,
        )
    return TransformerTrainModuleConfig(
        rank_microbatch_size=t.rank_microbatch_size * seq,  # tokens
        max_sequence_length=seq,
        optim=AdamWConfig(
            lr=t.lr,
            betas=(t.betas[0], t.betas[1]),
            eps=t.eps,
            weight_decay=t.weight_decay,
            group_overrides=[OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))],
            fused=device.type == "cuda" or None,
        ),
        max_grad_norm=t.max_grad_norm,
        scheduler=scheduler,
        compile_model=t.compile,
        dp_config=dp,
        tp_config=TransformerTensorParallelConfig(degree=t.tensor_parallel_degree)
        if t.tensor_parallel_degree > 1
        else None,
        ep_config=TransformerExpertParallelConfig(degree=t.expert_parallel_degree)
        if t.expert_parallel_degree > 1
        else None,
        ac_config=_ac_config(t.activation_checkpointing),
        autocast_precision=DType(t.autocast) if t.autocast else None,
    )


def _use_grouped_mm(choice: str, device: torch.device) -> bool:
    """``auto``: grouped_mm on a capable GPU unless OLMo-core found ``grouped_gemm``."""
    from .moe_grouped import grouped_mm_available

    if choice == "olmo-core" or device.type != "cuda":
        return False
    if not grouped_mm_available(device):
        if choice == "grouped_mm":
            raise ValueError("train.moe_matmul='grouped_mm' needs a CUDA GPU with compute capability >= 8.0")
        return False
    if choice == "grouped_mm":
        return True
    from olmo_core.nn.moe import mlp as moe_mlp

    return getattr(moe_mlp, "gmm", None) is None


def _ac_config(mode: str | None):
    from olmo_core.train.train_module import TransformerActivationCheckpointingConfig

    if mode is None:
        return None
    if mode == "attention":
        return TransformerActivationCheckpointingConfig(mode="selected_modules", modules=["blocks.*.attention"])
    return TransformerActivationCheckpointingConfig(mode=mode)


def _check_parallelism(recipe: Recipe, device: torch.device) -> None:
    t = recipe.train
    if device.type != "cuda" and (t.expert_parallel_degree > 1 or t.tensor_parallel_degree > 1):
        raise ValueError(
            "expert/tensor parallelism needs GPUs (OLMo-core's MoE kernels); on a CPU use "
            "train.expert_parallel_degree=1 and train.tensor_parallel_degree=1"
        )
    if t.expert_parallel_degree > 1 and t.data_parallel != "hsdp":
        raise ValueError(
            f"train.expert_parallel_degree={t.expert_parallel_degree} needs "
            f"train.data_parallel=hsdp (OLMo-core shards experts over HSDP's replica mesh), "
            f"got train.data_parallel={t.data_parallel!r}"
        )
    per_step = t.global_batch_size
    dp_world = world_size() // (t.tensor_parallel_degree * t.context_parallel_degree)
    if per_step % (t.rank_microbatch_size * max(dp_world, 1)):
        raise ValueError(
            f"train.global_batch_size={per_step} must be a multiple of rank_microbatch_size "
            f"({t.rank_microbatch_size}) x data-parallel ranks ({dp_world})"
        )


def mask_documents_in_dense_layers(model, recipe: Recipe) -> int:
    """With ``data.document_masking`` on a dense recipe, runs the dense layers through this package's
    backend with the ``dense`` pattern (every causal pair, within each document), in place: OLMo-core's
    own torch SDPA backend cannot mask packed documents, and its flash backends need flash-attn. Same
    parameters and checkpoints; the model config stays dense. Returns the number of layers switched."""
    if not recipe.data.document_masking or recipe.attention != "dense":
        return 0
    from ..bands import BandSpec
    from .attention import set_model_attention

    spec = BandSpec("dense", recipe.model.n_heads, recipe.train.sequence_length)
    count = set_model_attention(model, spec, recipe.attention_backend)
    log.info("dense attention with document masking: %d layers run the %s backend's dense pattern", count,
             recipe.attention_backend)
    return count


def train(recipe: Recipe, *, overwrite: bool = False, allow_attention_change: bool = False) -> dict[str, float]:
    """Trains ``recipe`` (resuming from ``train.save_folder`` if it holds a checkpoint).

    ``overwrite`` deletes the folder's checkpoints first (a new run); ``allow_attention_change``
    resumes a checkpoint of another attention on purpose (see :mod:`olmoe_spattn.olmo.resume`).
    Returns the last logged metrics (rank 0; empty elsewhere).
    """
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig
    from olmo_core.distributed.utils import barrier
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train import teardown_training_environment as teardown
    from olmo_core.train.common import LoadStrategy

    from .model import needs_torch_moe
    from .resume import prepare_save_folder

    device = resolve_device(recipe)
    _check_parallelism(recipe, device)
    t = recipe.train
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    prepare_training_environment(seed=t.seed, backend=backend, shared_filesystem=True)
    try:
        prepare_save_folder(recipe, overwrite=overwrite, allow_attention_change=allow_attention_change)
        barrier()
        paths = ensure_data(recipe)
        save_folder = str(Path(t.save_folder).resolve())
        model_config = recipe.model_config()
        model = model_config.build(init_device="meta")
        mask_documents_in_dense_layers(model, recipe)
        if needs_torch_moe(device):
            from .moe_cpu import use_torch_moe

            use_torch_moe(model)
        elif _use_grouped_mm(t.moe_matmul, device):
            from .moe_grouped import use_grouped_mm_moe

            use_grouped_mm_moe(model)
        train_module = _train_module_config(recipe, device).build(model, device=device)

        dataset = NumpyFSLDatasetConfig(
            tokenizer=recipe.data.tokenizer,
            paths=paths,
            sequence_length=t.sequence_length,
            dtype=recipe.data.dtype,
            generate_doc_lengths=recipe.data.document_masking,
            work_dir=recipe.data.work_dir or str(Path(save_folder) / "dataset-cache"),
        ).build()
        data_loader = NumpyDataLoaderConfig(
            global_batch_size=t.global_batch_size * t.sequence_length,  # tokens
            seed=t.seed,
            num_workers=t.num_workers,
        ).build(dataset, dp_process_group=train_module.dp_process_group)

        resuming = Path(save_folder).is_dir() and any(Path(save_folder).glob("step*/model_and_optim"))
        load_path = None if resuming else resolve_load_path(t.load_path)  # a resume ignores it
        check_load_path_architecture(recipe, load_path)
        trainer_config = TrainerConfig(
            save_folder=save_folder,
            # continued pretraining: weights only from load_path (fresh optimizer and step);
            # a checkpoint in save_folder always wins and restores everything (resume)
            load_path=load_path,
            load_strategy=LoadStrategy.always if load_path else LoadStrategy.if_available,
            load_trainer_state=False if load_path else None,
            load_optim_state=False if load_path else None,
            save_overwrite=True,
            max_duration=Duration.steps(t.max_steps),
            metrics_collect_interval=t.log_interval,
            cancel_check_interval=max(1, min(25, t.max_steps)),
            device=str(device),
        ).with_callbacks(_callbacks(recipe, save_folder))
        trainer = trainer_config.build(train_module, data_loader)
        record = {
            "recipe": recipe.as_dict(),
            "model": model_config.as_config_dict(),
            "trainer": trainer_config.as_config_dict(),
        }
        trainer.callbacks["config_saver"].config = record
        trainer.fit()
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        return _last_metrics(Path(save_folder) / METRICS_FILE)
    finally:
        teardown()


def _last_metrics(path: Path) -> dict[str, float]:
    steps = read_metrics(path.parent)
    return steps[max(steps)] if steps else {}


def read_metrics(save_folder: str | Path) -> dict[int, dict[str, float]]:
    """Per-step metrics from ``metrics.jsonl`` (records of one step are merged; a step run again
    after a resume overwrites the earlier values)."""
    path = Path(save_folder) / METRICS_FILE
    out: dict[int, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec["step"]), {}).update(rec)
    return out

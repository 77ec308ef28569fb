"""Helpers for the HF / conversion / evaluation tests: tiny tokenizer, tiny OLMoE, checkpoints.

Everything is built locally (no hub): a byte-level BPE tokenizer, an OLMo-core OLMoE with
d_model 64, 2 layers, 4 heads, 4 experts (top-2), and its checkpoint in OLMo-core's
unsharded (safetensors) or distributed (torch.distributed.checkpoint) form.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 300
N_HEADS = 4
#: small partition so short test sequences cross it (pairs with d >= N exist)
PARTITION_LEN = 16
TOKENIZER_INFO = {"vocab_size": VOCAB, "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": None}


def build_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE tokenizer directory (``<|endoftext|>`` = 0, ``<|padding|>`` = 1)."""
    try:
        from olmoe_spattn.data.tiny_tokenizer import build_tiny_tokenizer
    except ImportError:
        build_tiny_tokenizer = None
    if build_tiny_tokenizer is not None:
        return build_tiny_tokenizer(out_dir, vocab_size=VOCAB)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "sparse attention bands per head"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def model_config(pattern: str, partition_len: int | str | None = PARTITION_LEN):
    """Tiny OLMoE ``TransformerConfig`` with ``pattern`` attention (``dense`` allowed)."""
    from olmoe_spattn.olmo import tiny_model_config

    return tiny_model_config(
        attention=pattern,
        vocab_size=VOCAB,
        partition_len=None if pattern == "dense" else partition_len,
        backend="torch",
        n_heads=N_HEADS,
    )


def build_olmo_model(config, seed: int = 0) -> torch.nn.Module:
    """OLMo-core model on the CPU (PyTorch MoE path), deterministic weights, eval mode.

    Weights are re-drawn with a larger std than OLMo-core's init so the attention pattern
    visibly changes the logits (a test comparing patterns can fail).
    """
    from olmoe_spattn.olmo import build_model

    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def experiment_dict(config) -> dict:
    """The parts of an OLMo-core experiment config that conversion reads."""
    return {
        "model": config.as_config_dict(),
        "dataset": {"tokenizer": dict(TOKENIZER_INFO), "sequence_length": 4 * PARTITION_LEN},
    }


def save_unsharded(model, config, out_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """``model.safetensors`` + experiment ``config.json`` (+ ``tokenizer/``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(experiment_dict(config)))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out_dir / "tokenizer", dirs_exist_ok=True)
    return out_dir


def save_distributed(model, config, step_dir: Path) -> Path:
    """An OLMo-core training step folder: ``config.json`` + ``model_and_optim/`` (DCP)."""
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    step_dir.mkdir(parents=True, exist_ok=True)
    save_model_and_optim_state(str(step_dir / "model_and_optim"), model)
    (step_dir / "config.json").write_text(json.dumps(experiment_dict(config)))
    return step_dir


def olmo_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """OLMo-core logits ``[B, T, V]`` in float32."""
    with torch.no_grad():
        out = model(ids)
    logits = getattr(out, "logits", out)
    return logits.float()


def hf_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers logits ``[B, T, V]`` in float32 (no cache)."""
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, use_cache=False).logits.float()


def greedy_by_full_forward(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass per step (the reference for ``generate``)."""
    ids = prompt
    for _ in range(new_tokens):
        nxt = hf_logits(model, ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def hf_tiny_model(pattern: str, partition_len: int | str = PARTITION_LEN, seed: int = 0):
    """A tiny ``OlmoeSpattnForCausalLM`` built directly (no OLMo-core), eval mode, no EOS stop."""
    from olmoe_spattn.hf import OlmoeSpattnConfig, OlmoeSpattnForCausalLM

    config = OlmoeSpattnConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_experts=4,
        num_experts_per_tok=2,
        attention_pattern=pattern,
        partition_len=partition_len,
        eos_token_id=None,
        pad_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = OlmoeSpattnForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    return model.eval()

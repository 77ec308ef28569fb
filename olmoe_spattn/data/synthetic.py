"""Small synthetic token files in OLMo-core's numpy format (raw ``np.memmap`` arrays).

The tokens are not noise: documents follow a fixed random first-order Markov chain (each token
has a handful of likely successors), so a model can learn them and the loss visibly drops within
a few dozen CPU steps. Documents end with ``eos_token_id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The token dtype OLMo-core infers for ``vocab_size`` (``NumpyDatasetConfig.get_dtype``, the
    smallest of uint8..uint64), so files written here read back right when a recipe sets no dtype."""
    from olmo_core.data import NumpyFSLDatasetConfig, TokenizerConfig

    tokenizer = TokenizerConfig(vocab_size=vocab_size, eos_token_id=0, pad_token_id=0)
    return NumpyFSLDatasetConfig(tokenizer=tokenizer, sequence_length=1, paths=[]).get_dtype()


def synthetic_tokens(
    n_tokens: int,
    vocab_size: int,
    *,
    eos_token_id: int,
    seed: int = 0,
    successors: int = 4,
    mean_doc_len: int = 200,
) -> np.ndarray:
    """``[n_tokens]`` token IDs drawn from a seeded Markov chain, documents split by EOS."""
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8 for synthetic data, got {vocab_size}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab_size, size=(vocab_size, successors))  # likely next tokens
    choice = rng.integers(0, successors, size=n_tokens)
    ends = rng.random(n_tokens) < 1.0 / mean_doc_len
    out = np.empty(n_tokens, dtype=np.int64)
    tok = int(rng.integers(0, vocab_size))
    for i in range(n_tokens):
        if ends[i]:
            out[i] = eos_token_id
            tok = int(rng.integers(0, vocab_size))
            continue
        tok = int(table[tok, choice[i]])
        if tok == eos_token_id:
            tok = (tok + 1) % vocab_size
        out[i] = tok
    return out.astype(token_dtype(vocab_size))


def write_synthetic_tokens(
    path: str | Path,
    n_tokens: int,
    vocab_size: int,
    *,
    eos_token_id: int,
    seed: int = 0,
) -> Path:
    """Writes :func:`synthetic_tokens` to ``path`` (creating parent folders); returns the path."""
    from olmo_core.data.utils import write_array_to_disk

    path = Path(path)
    tokens = synthetic_tokens(n_tokens, vocab_size, eos_token_id=eos_token_id, seed=seed)
    write_array_to_disk(tokens, path)  # OLMo-core's writer: temp file, then an atomic rename
    return path

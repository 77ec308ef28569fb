"""Tokenizer files that travel with training: the tiny recipe's built-in text data, and a copy
of a local tokenizer directory in every checkpoint.

When ``data.tokenizer.identifier`` names a local directory holding ``tokenizer.json``, each
saved checkpoint gets a copy of it as ``stepN/tokenizer/``, which ``convert to-hf`` picks up, so
a converted model evaluates without extra flags. Hub names (e.g.
``allenai/gpt-neox-olmo-dolma-v1_5``) are left alone: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import Recipe

log = logging.getLogger(__name__)

#: the folder inside a checkpoint directory that holds the tokenizer copy
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


def local_tokenizer_dir(recipe: Recipe) -> Path | None:
    """``data.tokenizer.identifier`` as a local directory with ``tokenizer.json``, else ``None``."""
    identifier = recipe.data.tokenizer.identifier
    if not identifier:
        return None
    path = Path(identifier)
    return path if (path / "tokenizer.json").is_file() else None


def ensure_builtin_text(recipe: Recipe) -> list[str]:
    """``data.builtin_text``: writes the tokenizer and token file on rank 0 if either is missing
    (other ranks wait); returns ``data.paths``."""
    from ..data.tiny_text import write_tiny_text_data

    data = recipe.data
    tokens = Path(data.paths[0])
    tok_dir = Path(data.tokenizer.identifier or "")
    has_tokenizer = (tok_dir / "tokenizer.json").is_file()
    if int(os.environ.get("RANK", "0")) == 0 and not (tokens.exists() and has_tokenizer):
        write = dict(
            vocab_size=data.tokenizer.vocab_size,
            eos_token_id=data.tokenizer.eos_token_id,
            pad_token_id=data.tokenizer.pad_token_id,
        )
        if not tokens.exists():
            log.info("tokenizing the built-in text to %s (tokenizer in %s)", tokens, tok_dir)
            write_tiny_text_data(tokens, tok_dir, **write)
        else:  # the tokenizer is built from the shipped text: rebuild it if it gives this file
            check = tokens.with_name(tokens.name + ".check")
            write_tiny_text_data(check, tok_dir, **write)
            same = check.read_bytes() == tokens.read_bytes()
            check.unlink()
            if not same:  # never pair a token file with a tokenizer that did not make it
                raise ValueError(
                    f"data.builtin_text: {tokens} exists but was not made by the tokenizer built in "
                    f"data.tokenizer.identifier={str(tok_dir)!r}; delete {tokens} to rebuild both, or set "
                    "data.builtin_text=false to train on your own token file"
                )
            log.info("rebuilt the built-in text's tokenizer in %s (it reproduces %s)", tok_dir, tokens)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return [str(tokens)]


def tokenizer_callbacks(recipe: Recipe) -> dict[str, Any]:
    """``{"tokenizer_saver": callback}`` when the recipe's tokenizer is a local directory, else ``{}``."""
    source = local_tokenizer_dir(recipe)
    if source is None:
        return {}
    from olmo_core.distributed.utils import get_rank
    from olmo_core.train.callbacks import Callback

    @dataclass
    class TokenizerSaverCallback(Callback):
        """Copies the tokenizer directory into every checkpoint saved on the local file system."""

        source: str = ""

        def post_checkpoint_saved(self, path: Any) -> None:
            target = Path(str(path))
            if get_rank() != 0 or "://" in str(path) or not target.is_dir():
                return
            shutil.copytree(self.source, target / CHECKPOINT_TOKENIZER_DIR, dirs_exist_ok=True)

    return {"tokenizer_saver": TokenizerSaverCallback(source=str(source.resolve()))}

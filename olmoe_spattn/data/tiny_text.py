"""The tiny recipe's real-text data: a short English text shipped with the package, its locally
built tokenizer, and the token file OLMo-core trains on.

``tiny_text.txt`` (next to this module, about 14 KB) was written for this package and is
distributed under the package's license: everyday facts, short fables retold in plain words,
a few small stories, and a plain-language description of language models, attention, SPAttention
and mixtures of experts. Paragraphs are documents (separated by blank lines).

:func:`write_tiny_text_data` trains the tiny byte-level BPE tokenizer
(:mod:`olmoe_spattn.data.tiny_tokenizer`) on that text, saves it as a Hugging Face tokenizer
directory, tokenizes every paragraph (each followed by EOS) and writes the ids as a raw numpy
token file. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .synthetic import token_dtype

#: the shipped text
TEXT_PATH = Path(__file__).with_name("tiny_text.txt")


def documents(path: str | Path = TEXT_PATH) -> list[str]:
    """The text's paragraphs (blank-line separated), each joined into one line."""
    text = Path(path).read_text(encoding="utf-8")
    paragraphs = (" ".join(block.split()) for block in text.split("\n\n"))
    return [p for p in paragraphs if p]


def write_tiny_text_data(
    tokens_path: str | Path,
    tokenizer_dir: str | Path,
    *,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Path:
    """Builds the tokenizer into ``tokenizer_dir`` (if it has no ``tokenizer.json`` yet) and writes
    the tokenized text to ``tokens_path``; returns ``tokens_path``.

    Raises:
        ValueError: the recipe's token ids disagree with the tokenizer's (EOS is id 0 and padding
            id 1 in the tiny tokenizer), or the tokenizer's vocabulary is larger than ``vocab_size``.
    """
    from .tiny_tokenizer import EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer

    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # transformers/tokenizers come with the eval extra
        raise ValueError(
            "data.builtin_text needs the tokenizers and transformers packages: pip install -e '.[eval]'"
        ) from err
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tiny_tokenizer(tokenizer_dir, vocab_size=vocab_size, texts=documents())
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"eos_token_id": tok.convert_tokens_to_ids(EOS_TOKEN), "pad_token_id": tok.convert_tokens_to_ids(PAD_TOKEN)}
    for key, want in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if ids[key] != want:
            raise ValueError(f"data.tokenizer.{key}={want}, but the tokenizer in {tokenizer_dir} has {ids[key]}")
    if len(tok) > vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {len(tok)} tokens, more than data.tokenizer.vocab_size={vocab_size}"
        )
    tokens: list[int] = []
    for doc in documents():
        tokens.extend(tok(doc, add_special_tokens=False)["input_ids"])
        tokens.append(eos_token_id)
    array = np.asarray(tokens, dtype=token_dtype(vocab_size))  # [n_tokens]
    path = Path(tokens_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    array.tofile(tmp)
    tmp.replace(path)  # atomic: concurrent ranks never read a half-written file
    return path

"""A tiny byte-level BPE tokenizer built locally, for tests and offline users.

The recipes name ``allenai/gpt-neox-olmo-dolma-v1_5``, which needs the Hugging Face hub.
Without network access, :func:`build_tiny_tokenizer` trains a small byte-level BPE (so every
string is encodable, nothing maps to an unknown token) on a built-in sample text, or on
text you pass, and saves it as a Hugging Face tokenizer directory that
``transformers.AutoTokenizer.from_pretrained(dir)`` and ``olmoe-spattn prepare-data
--tokenizer dir`` both load offline.

Special tokens follow the GPT-NeoX / OLMo convention: ``<|endoftext|>`` (id 0, used as EOS
and BOS) and ``<|padding|>`` (id 1).

Command line::

    python -m olmoe_spattn.data.tiny_tokenizer OUT_DIR [--vocab-size 512] [--text FILE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
#: ids 0 and 1, in this order
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)
#: 256 byte symbols + the special tokens: the smallest vocabulary byte-level BPE can have
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

_SAMPLE_TEXT = """\
Sparse attention lets each head look at only part of the sequence.
In SPAttention every head owns one band of distances, and together the heads cover the
causal triangle exactly once. A mixture of experts routes each token to a few experts.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation: , . ; : ! ? ( ) [ ] { } " '
Language models learn to predict the next token from the tokens before it.
Training data is tokenized once and stored as flat arrays of token ids.
"""


def sample_corpus(repeats: int = 8) -> list[str]:
    """The built-in training text, one line per document, repeated ``repeats`` times."""
    lines = [line for line in _SAMPLE_TEXT.splitlines() if line.strip()]
    return lines * repeats


def build_tiny_tokenizer(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    texts: Iterable[str] | None = None,
    model_max_length: int = 4096,
) -> Path:
    """Trains a byte-level BPE tokenizer and saves it as a Hugging Face tokenizer directory.

    Args:
        out_dir: directory to write (created if missing); holds ``tokenizer.json`` and
            ``tokenizer_config.json`` afterwards.
        vocab_size: target vocabulary size, at least :data:`MIN_VOCAB_SIZE`; training stops
            earlier when the text has no more merges to offer.
        texts: training text (default: :func:`sample_corpus`).
        model_max_length: recorded in ``tokenizer_config.json``.

    Returns:
        The directory path.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus: Iterator[str] = iter(sample_corpus() if texts is None else texts)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m olmoe_spattn.data.tiny_tokenizer OUT_DIR``: build and save the tokenizer."""
    parser = argparse.ArgumentParser(
        prog="python -m olmoe_spattn.data.tiny_tokenizer",
        description="Train a tiny byte-level BPE tokenizer locally and save it as a Hugging Face "
        "tokenizer directory (works offline; for tests and quick experiments).",
    )
    parser.add_argument("out_dir", help="directory to write the tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=512, help="target vocabulary size (default 512)")
    parser.add_argument(
        "--text",
        nargs="*",
        default=None,
        metavar="FILE",
        help="plain-text files to train on, one document per line (default: a built-in sample)",
    )
    args = parser.parse_args(argv)
    texts = None
    if args.text:
        texts = []
        for name in args.text:
            path = Path(name)
            if not path.is_file():
                print(f"error: text file {name!r} does not exist", file=sys.stderr)
                return 2
            texts.extend(path.read_text(encoding="utf-8").splitlines())
    try:
        out = build_tiny_tokenizer(args.out_dir, vocab_size=args.vocab_size, texts=texts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

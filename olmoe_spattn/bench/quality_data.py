"""Offline training text for the quality study: a corpus of local files, a BPE tokenizer
trained on it, and flat token arrays for training and held-out evaluation.

Default corpus: the Python standard library's own files (``*.py``, ``*.txt``, ``*.rst``
under ``sysconfig.get_paths()["stdlib"]``, without ``site-packages``): real, varied text
(code, docstrings, comments) present on every machine with Python; plus, where it exists,
``/usr/share/doc`` (Debian package documentation: READMEs, NEWS, Markdown and text files,
many gzip-compressed; changelogs and licence files are left out as repetitive). No network
needed. ``--corpus`` takes any files or folders instead (``.txt``, ``.md``, ``.rst``,
``.py``, README and NEWS files, each optionally ``.gz``). Identical documents are kept once.

Held-out documents are chosen by a stable hash of their path, so the split does not depend
on the order files are found in, and no document is in both splits.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".rst", ".py")
SKIP_DIRS: frozenset[str] = frozenset({"site-packages", "__pycache__"})
MAX_FILE_BYTES = 4 * 2**20  # larger files are skipped (generated tables, data dumps)
#: the tokenizer is trained on at most this many characters of the training split
TOKENIZER_TRAIN_CHARS = 10_000_000


def default_corpus() -> list[Path]:
    """The default corpus: the Python standard library folder, and ``/usr/share/doc`` where
    it exists (Debian/Ubuntu package documentation, much of it gzip-compressed)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if Path("/usr/share/doc").is_dir():
        roots.append(Path("/usr/share/doc"))
    return roots


#: files without a text suffix that are still plain text (Debian package docs)
TEXT_NAME_PREFIXES: tuple[str, ...] = ("readme", "news")


def _is_text_file(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix in TEXT_SUFFIXES or name.lower().startswith(TEXT_NAME_PREFIXES)


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Text files named by ``paths`` (files as given; folders searched recursively for
    :data:`TEXT_SUFFIXES`, optionally ``.gz``, skipping :data:`SKIP_DIRS`), sorted."""
    found: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for f in path.rglob("*"):
                if f.is_file() and _is_text_file(f) and not SKIP_DIRS.intersection(f.relative_to(path).parts[:-1]):
                    found.add(f)
        else:
            raise ValueError(f"--corpus path {str(path)!r} does not exist")
    files = sorted(f for f in found if f.stat().st_size <= MAX_FILE_BYTES)
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}, optionally .gz) found under {list(map(str, paths))}")
    return files


def read_text(path: Path) -> str:
    """The file's text (gunzipped if ``.gz``); undecodable bytes become U+FFFD; '' for binaries."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError:
            return ""
    if b"\x00" in data[:4096]:
        return ""
    return data.decode("utf-8", errors="replace")


def split_files(files: Sequence[Path], heldout_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out when crc32 of its name and size falls below
    ``heldout_percent``; at least one file lands on each side when there are two or more."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"--heldout-percent must be in (0, 100), got {heldout_percent}")
    train, held = [], []
    for f in files:
        h = zlib.crc32(f"{f.name}:{f.stat().st_size}".encode()) % 10_000
        (held if h < heldout_percent * 100 else train).append(f)
    if len(files) >= 2 and (not train or not held):
        ordered = sorted(files, key=lambda f: zlib.crc32(f.name.encode()))
        k = max(1, round(len(files) * heldout_percent / 100))
        held, train = ordered[:k], ordered[k:]
    return train, held


@dataclass
class Corpus:
    """Token arrays and what they came from."""

    train: np.ndarray  # [n_train_tokens] int32
    heldout: np.ndarray  # [n_heldout_tokens] int32
    vocab_size: int
    tokenizer_dir: Path
    description: dict


def _fingerprint(files: Sequence[Path], vocab_size: int, heldout_percent: float) -> str:
    h = hashlib.sha256(f"{vocab_size}:{heldout_percent}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def _encode(tokenizer, texts: Iterable[str], eos_id: int) -> np.ndarray:
    out: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            out.append(np.asarray([*enc.ids, eos_id], dtype=np.int32))
        batch.clear()

    for text in texts:
        if text.strip():
            batch.append(text)
        if len(batch) >= 256:
            flush()
    if batch:
        flush()
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def prepare_corpus(paths: Sequence[str | Path] | None, work_dir: str | Path, *, vocab_size: int = 8192,
                   heldout_percent: float = 5.0, log=print) -> Corpus:
    """Collects, splits and tokenizes the corpus (default: :func:`default_corpus`); trains a
    byte-level BPE tokenizer on the training split. Results are cached under ``work_dir``
    and reused while the files, vocabulary size and split are unchanged."""
    from ..data.tiny_tokenizer import EOS_TOKEN, build_tiny_tokenizer

    roots = list(paths) if paths else default_corpus()
    files = collect_files(roots)
    train_files, held_files = split_files(files, heldout_percent)
    work = Path(work_dir)
    tok_dir, cache = work / "tokenizer", work / "tokens"
    fp = _fingerprint(files, vocab_size, heldout_percent)
    manifest = cache / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fp:
        desc = json.loads(manifest.read_text())
        log(f"corpus: reusing tokens in {cache}")
        return Corpus(np.load(cache / "train.npy"), np.load(cache / "heldout.npy"), desc["vocab_size"],
                      tok_dir, desc)
    texts, seen = {}, set()
    for f in files:  # identical documents (licence texts, copies) are kept once
        text = read_text(f)
        digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
        if text.strip() and digest not in seen:
            seen.add(digest)
            texts[f] = text
    train_files = [f for f in train_files if f in texts]
    held_files = [f for f in held_files if f in texts]
    train_texts = [texts[f] for f in train_files]
    held_texts = [texts[f] for f in held_files]
    if not held_texts:  # a single file: its last lines are held out
        lines = "\n".join(train_texts).splitlines()
        cut = max(1, int(len(lines) * (1 - heldout_percent / 100)))
        train_texts, held_texts = ["\n".join(lines[:cut])], ["\n".join(lines[cut:])]
    n_chars = sum(map(len, train_texts))
    log(f"corpus: {len(files)} files ({len(train_files)} train, {len(held_files)} held out), "
        f"{n_chars / 1e6:.1f}M training characters; training a {vocab_size}-token BPE tokenizer ...")

    def tokenizer_texts() -> Iterable[str]:
        """Training documents in a fixed shuffled order (so every part of the corpus is
        sampled), up to :data:`TOKENIZER_TRAIN_CHARS` characters."""
        order = list(range(len(train_texts)))
        random.Random(0).shuffle(order)
        used = 0
        for i in order:
            if used >= TOKENIZER_TRAIN_CHARS:
                return
            used += len(train_texts[i])
            yield train_texts[i]

    build_tiny_tokenizer(tok_dir, vocab_size=vocab_size, texts=tokenizer_texts())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS_TOKEN)
    train = _encode(tok, train_texts, eos_id)
    held = _encode(tok, held_texts, eos_id)
    desc = {
        "fingerprint": fp,
        "roots": [str(r) for r in roots],
        "n_files": len(files),
        "n_train_files": len(train_files),
        "n_heldout_files": len(held_files),
        "train_tokens": int(train.size),
        "heldout_tokens": int(held.size),
        "vocab_size": tok.get_vocab_size(),
        "heldout_percent": heldout_percent,
    }
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cache / "train.npy", train)
    np.save(cache / "heldout.npy", held)
    manifest.write_text(json.dumps(desc, indent=2))
    log(f"corpus: {train.size:,} training tokens, {held.size:,} held-out tokens (vocab {tok.get_vocab_size()})")
    return Corpus(train, held, tok.get_vocab_size(), tok_dir, desc)

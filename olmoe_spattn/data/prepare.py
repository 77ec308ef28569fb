"""Tokenize local text into OLMo-core's numpy token files.

On-disk format (what ``olmo_core.data``'s ``NumpyFSLDataset`` and friends read): each
``part-NNNNN.npy`` is a *raw* little-endian array of unsigned token ids with no header
(``np.memmap(path, dtype=..., mode="r")`` reads it back), documents concatenated, each one
followed by the EOS token. Beside each array, ``part-NNNNN.csv.gz`` lists one
``start,end`` line per document (end exclusive, EOS included), the Dolma metadata that
OLMo-core's document-index code reads when it cannot scan the array itself. A document
never spans two files. ``prepare_data.json`` records the tokenizer, dtype, EOS id, vocab
size and counts.

The dtype defaults to the smallest of uint16 / uint32 / uint64 that holds ``vocab_size - 1``
(OLMo-core's own inference rule, except that uint8 is only used when asked for, as OLMo-core's
default dtype is uint16). Set the same ``dtype`` in the dataset config.

Inputs: ``.jsonl`` / ``.json`` (one JSON object per line, optionally ``.gz``) and
``.parquet`` files, or directories holding them; the text comes from one field
(``text`` by default).

Dolma's ``dolma tokens`` writes the same format at corpus scale; it is not a dependency of this
package, so local files are tokenized here with the transformers tokenizer alone.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import DTYPES

#: file-name endings read as JSON lines / Parquet
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
MANIFEST_NAME = "prepare_data.json"

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------- inputs
def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expands files and directories into a sorted, de-duplicated list of input files.

    A directory contributes every ``.jsonl``/``.json``(``.gz``)/``.parquet`` file below it.
    Raises ``ValueError`` for a missing path, an unsupported file type or no input at all.
    """
    if not inputs:
        raise ValueError("no input files given")
    allowed = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            if not inside:
                raise ValueError(f"input directory {str(path)!r} holds no files ending in {allowed}")
            found.extend(inside)
        elif path.is_file():
            if _kind(path) is None:
                raise ValueError(f"input file {str(path)!r} has an unsupported type; allowed endings: {allowed}")
            found.append(path)
        else:
            raise ValueError(f"input {str(path)!r} does not exist")
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


def _field_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        hint = " (a JSON array file is not supported: write one object per line)" if isinstance(record, list) else ""
        raise ValueError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}{hint}"
        )
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"{where}: no field {text_field!r} (fields present: {keys}); choose one with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Yields the ``text_field`` string of every non-blank line of a JSON-lines file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            yield _field_text(record, text_field, where)


def iter_parquet(path: Path, text_field: str, batch_rows: int = 4096) -> Iterator[str]:
    """Yields the ``text_field`` column of a Parquet file, row by row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise ValueError(
            f"{path}: no column {text_field!r} (columns present: {', '.join(columns) or 'none'}); "
            "choose one with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}: row {row}: column {text_field!r} must hold strings, got {type(text).__name__}"
                )
            yield text


def iter_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one input file, in file order."""
    kind = _kind(path)
    if kind == "jsonl":
        return iter_jsonl(path, text_field)
    if kind == "parquet":
        return iter_parquet(path, text_field)
    raise ValueError(f"unsupported input file {str(path)!r}")


# ------------------------------------------------------------------------------ tokenizer
@dataclass
class TokenizerInfo:
    """What tokenization needs from a tokenizer: a batch encoder and its special ids."""

    identifier: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int | None
    encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)


def load_tokenizer(name_or_path: str, *, eos_token_id: int | None = None) -> TokenizerInfo:
    """Loads a Hugging Face tokenizer (a local directory, or a hub id when online).

    The EOS id comes from the tokenizer unless ``eos_token_id`` is given. Raises
    ``ValueError`` when the tokenizer cannot be loaded or has no EOS token.
    """
    from transformers import AutoTokenizer

    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise ValueError(
            f"tokenizer {name_or_path!r} is a file; pass the Hugging Face tokenizer directory that holds it"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        hint = (
            "the directory does not hold a loadable tokenizer"
            if local.is_dir()
            else "it is not a local directory and could not be fetched from the Hugging Face hub "
            "(offline? download it elsewhere with tokenizer.save_pretrained(dir) and pass the directory, "
            "or build one with python -m olmoe_spattn.data.tiny_tokenizer DIR)"
        )
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {hint} ({type(err).__name__}: {err})") from None
    eos = tok.eos_token_id if eos_token_id is None else eos_token_id
    vocab_size = len(tok)
    if eos is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; pass --eos-token-id")
    if not 0 <= int(eos) < vocab_size:
        raise ValueError(f"eos_token_id={eos} is outside the tokenizer's vocabulary [0, {vocab_size})")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    else:  # a slow (pure Python) tokenizer

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"]

    return TokenizerInfo(
        identifier=str(name_or_path),
        vocab_size=vocab_size,
        eos_token_id=int(eos),
        pad_token_id=tok.pad_token_id,
        encode_batch=encode_batch,
    )


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The token dtype: ``requested``, or (``auto``) the one OLMo-core infers for ``vocab_size``."""
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; allowed: {', '.join(DTYPES)}")
    if requested == "auto":
        from .synthetic import token_dtype

        return np.dtype(token_dtype(vocab_size))
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"dtype {requested} cannot hold token ids up to {vocab_size - 1} (vocab_size={vocab_size})")
    return dtype


# --------------------------------------------------------------------------------- writer
class TokenFileWriter:
    """Appends EOS-terminated documents to ``part-NNNNN.npy`` files, starting a new file when
    the next document would push the current one past ``max_tokens_per_file``.

    Streaming, unlike OLMo-core's ``memmap_to_write`` (which needs the final size up front), and
    writing document boundaries as they are known, unlike ``write_document_indices`` (which splits
    at every EOS id, wrong for a document whose text encodes the EOS token)."""

    def __init__(self, out_dir: Path, dtype: np.dtype, max_tokens_per_file: int, prefix: str = "part"):
        self.out_dir = out_dir
        self.dtype = dtype
        self.max_tokens_per_file = max_tokens_per_file
        self.prefix = prefix
        self.files: list[Path] = []
        self._f = None
        self._meta = None
        self._tokens_in_file = 0
        self._tmp: Path | None = None

    def _open_next(self) -> None:
        self._close_current()
        path = self.out_dir / f"{self.prefix}-{len(self.files):05d}.npy"
        self._tmp = path.with_name(path.name + ".tmp")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_current
        self._meta = gzip.open(path.with_suffix(".csv.gz"), "wt")
        self.files.append(path)
        self._tokens_in_file = 0

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            self._meta.close()
            self._tmp.replace(self.files[-1])
            self._f = self._meta = self._tmp = None

    def write(self, ids: np.ndarray) -> None:
        """Writes one document (token ids, EOS already appended)."""
        n = int(ids.shape[0])
        if self._f is None or (self._tokens_in_file and self._tokens_in_file + n > self.max_tokens_per_file):
            self._open_next()
        ids.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self._f)
        self._meta.write(f"{self._tokens_in_file},{self._tokens_in_file + n}\n")
        self._tokens_in_file += n

    def close(self) -> list[Path]:
        """Finishes the last file; returns every file written."""
        self._close_current()
        return self.files

    def abort(self) -> None:
        """Closes and removes the unfinished file after an error."""
        if self._f is not None:
            self._f.close()
            self._meta.close()
            self._tmp.unlink(missing_ok=True)
            self.files[-1].with_suffix(".csv.gz").unlink(missing_ok=True)
            self.files.pop()
            self._f = self._meta = self._tmp = None


# ------------------------------------------------------------------------------ pipeline
@dataclass
class PrepareResult:
    """What :func:`prepare_data` wrote."""

    output_dir: str
    files: list[str]
    dtype: str
    tokenizer: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int | None
    n_documents: int
    n_tokens: int
    n_skipped_empty: int
    inputs: list[str]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


def prepare_data(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    tokenizer: str,
    *,
    text_field: str = "text",
    dtype: str = "auto",
    eos_token_id: int | None = None,
    max_tokens_per_file: int = 2**30,
    batch_size: int = 512,
    max_documents: int | None = None,
    overwrite: bool = False,
    progress_every: float = 5.0,
    log: Log = print,
) -> PrepareResult:
    """Tokenizes every document of ``inputs`` into OLMo-core numpy token files in ``output_dir``.

    Each document becomes ``tokenize(text) + [EOS]``; empty (whitespace-only) documents are
    skipped and counted. A progress bar (input bytes, documents, tokens) redraws at most every
    ``progress_every`` seconds (negative: no bar); the start and summary lines go to ``log``.
    Raises ``ValueError`` for bad inputs or settings.

    Everything is written into a temporary folder beside ``output_dir`` and moved into place
    only when the whole input was read: a failure leaves ``output_dir`` as it was (with
    ``overwrite``, the old dataset is deleted only after the new one succeeded), and
    ``prepare_data.json`` always lists exactly the files beside it.
    """
    for name, value in (("max_tokens_per_file", max_tokens_per_file), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents <= 0):
        raise ValueError(f"max_documents must be a positive integer, got {max_documents!r}")
    if not text_field:
        raise ValueError("text_field must be a non-empty field name")
    files = resolve_inputs(inputs)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.glob("*.npy")) and not overwrite:
        raise ValueError(f"output directory {str(out)!r} already holds .npy files; pass --overwrite to replace them")
    tok = load_tokenizer(tokenizer, eos_token_id=eos_token_id)
    np_dtype = choose_dtype(tok.vocab_size, dtype)
    log(
        f"prepare-data: {len(files)} input file(s) -> {out} | tokenizer {tok.identifier} "
        f"(vocab {tok.vocab_size}, eos {tok.eos_token_id}) | dtype {np_dtype.name}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = _tokenize_into(staging, out, files, tok, np_dtype, text_field, max_tokens_per_file,
                                batch_size, max_documents, progress_every, log)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"done: {result.n_documents:,} docs, {result.n_tokens:,} tokens in {len(result.files)} file(s), "
        f"{result.seconds:.2f}s, {result.tokens_per_second:,.0f} tokens/s"
        + (f" ({result.n_skipped_empty} empty document(s) skipped)" if result.n_skipped_empty else "")
    )
    return result


def _dataset_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.npy"), *folder.glob("*.csv.gz")])


def _move_into_place(staging: Path, out: Path) -> None:
    """Publishes a finished dataset: a new folder is renamed into place at once; into an existing
    one the old manifest goes first, then the old token files, and the new manifest comes last,
    so a manifest on disk always lists exactly the files beside it."""
    if not out.exists():
        staging.rename(out)
        return
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in _dataset_files(out):
        stale.unlink()
    for fresh in _dataset_files(staging):
        fresh.replace(out / fresh.name)
    (staging / MANIFEST_NAME).replace(out / MANIFEST_NAME)


def _tokenize_into(
    staging: Path,
    out: Path,
    files: list[Path],
    tok: TokenizerInfo,
    np_dtype: np.dtype,
    text_field: str,
    max_tokens_per_file: int,
    batch_size: int,
    max_documents: int | None,
    progress_every: float,
    log: Log,
) -> PrepareResult:
    """Writes the token files and the manifest (naming the files as they will be in ``out``)
    into ``staging``."""
    writer = TokenFileWriter(staging, np_dtype, max_tokens_per_file)
    eos = np.array([tok.eos_token_id], dtype=np.int64)
    n_docs = n_tokens = n_empty = 0
    start = time.perf_counter()
    max_id = int(np.iinfo(np_dtype).max)
    # progress: input bytes done (whole files) of the total, with live document/token counts
    bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="prepare-data",
               mininterval=progress_every, disable=progress_every < 0)

    def flush(batch: list[str]) -> None:
        nonlocal n_docs, n_tokens
        for ids in tok.encode_batch(batch):
            arr = np.concatenate([np.asarray(ids, dtype=np.int64), eos])  # [len(doc) + 1]
            if arr.size > 1 and int(arr.max()) > max_id:
                raise ValueError(f"token id {int(arr.max())} does not fit dtype {np_dtype.name}")
            writer.write(arr)
            n_docs += 1
            n_tokens += int(arr.size)
        bar.set_postfix(docs=n_docs, tokens=n_tokens, files=len(writer.files), refresh=False)

    try:
        batch: list[str] = []
        done = False
        for path in files:
            for text in iter_documents(path, text_field):
                if not text.strip():
                    n_empty += 1
                    continue
                batch.append(text)
                if max_documents is not None and n_docs + len(batch) >= max_documents:
                    done = True
                    break
                if len(batch) >= batch_size:
                    flush(batch)
                    batch = []
                    bar.update(0)  # lets tqdm redraw the counts at its own pace
            bar.update(path.stat().st_size)
            if done:
                break
        if batch:
            flush(batch)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    written = writer.close()
    seconds = time.perf_counter() - start
    if n_docs == 0:
        raise ValueError(f"no non-empty documents found in {len(files)} input file(s) (field {text_field!r})")

    result = PrepareResult(
        output_dir=str(out),
        files=[str(out / p.name) for p in written],
        dtype=np_dtype.name,
        tokenizer=tok.identifier,
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        n_documents=n_docs,
        n_tokens=n_tokens,
        n_skipped_empty=n_empty,
        inputs=[str(p) for p in files],
        seconds=round(seconds, 3),
    )
    (staging / MANIFEST_NAME).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result

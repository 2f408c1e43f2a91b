"""Calibration and evaluation text: a name or path -> documents -> token windows [n, seq_len]. No model code."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from quantkit.config import DEFAULT_CALIB, DEFAULT_EVAL, CalibSpec
from quantkit.errors import CalibrationError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_SETS = {
    DEFAULT_CALIB: "pydocs-calib.jsonl",  # CPython 3.11 stdlib docstrings, calibration half
    DEFAULT_EVAL: "pydocs-eval.jsonl",   # the disjoint evaluation half; never calibrate on it
}


def builtin_dir() -> Path:
    """Where the built-in sets live: inside the installed package, or calibration/ in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "calibration_data"
    return packaged if packaged.is_dir() else package.parent / "calibration"


# Text is read lazily and only as far as needed, so a multi-GB file or a single enormous line costs neither the memory
# nor the tokenizer time of reading it whole: at most this many characters are read, and JSONL lines are bounded.
MIN_TEXT_BUDGET = 2 * 2**20          # characters; the built-in sets (about 1 MB) are always read whole
CHARS_PER_TOKEN_BUDGET = 32          # English averages about 4 a token: windows are drawn from ~8x the tokens needed
MAX_LINE_BYTES = 16 * 2**20
PARQUET_BATCH_ROWS = 1024            # rows per record batch read from a parquet file


def text_budget(tokens: int | None) -> int:
    """How many characters to read for `tokens` tokens (None: as many as MIN_TEXT_BUDGET)."""
    return max(MIN_TEXT_BUDGET, (tokens or 0) * CHARS_PER_TOKEN_BUDGET)


def load_documents(source: str, max_chars: int | None = None) -> list[str]:
    """Texts of a built-in set, a local .txt/.jsonl/.parquet file, or hf:<dataset>[:config][:split].

    :param max_chars: stop after this many characters (the last document is cut there); None reads everything.
    """
    if source in BUILTIN_SETS:
        return _read_jsonl(builtin_dir() / BUILTIN_SETS[source], max_chars)
    if source.startswith("hf:"):
        return _cut(_read_hf_dataset(source[3:]), max_chars)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration set {source!r} not found: not a built-in set "
                               f"({', '.join(BUILTIN_SETS)}), a file, or hf:<dataset id>")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_read_text(path, max_chars)]
    if suffix == ".jsonl":
        return _read_jsonl(path, max_chars)
    if suffix == ".parquet":
        return _cut(_read_parquet(path), max_chars)
    raise CalibrationError(f"{path}: unsupported calibration file type {suffix!r} (use .txt, .jsonl or .parquet)")


def _cut(docs: Iterable[str], max_chars: int | None) -> list[str]:
    """The documents up to `max_chars` characters, the last one cut there; `docs` is consumed no further than
    that, so a lazy source is read only as far as the budget needs."""
    if max_chars is None:
        return list(docs)
    out, total, docs = [], 0, iter(docs)
    while total < max_chars:
        d = next(docs, None)
        if d is None:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def _read_text(path: Path, max_chars: int | None) -> str:
    """The first `max_chars` characters of a UTF-8 file (all of it when None)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    pieces, chars, offset = [], 0, 0
    with open(path, "rb") as f:
        while max_chars is None or chars < max_chars:
            raw = f.read(1 << 20)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise CalibrationError(f"{path} is not valid UTF-8 (byte {offset + e.start}); "
                                       "re-encode it as UTF-8") from None
            pieces.append(text)
            chars += len(text)
            offset += len(raw)
            if not raw:
                break
    text = "".join(pieces)
    return text if max_chars is None else text[:max_chars]


def _read_jsonl(path: Path, max_chars: int | None) -> list[str]:
    docs, chars = [], 0
    with open(path, "rb") as f:
        lineno = 0
        while max_chars is None or chars < max_chars:
            lineno += 1
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise CalibrationError(f"{path}:{lineno}: line is longer than {MAX_LINE_BYTES // 2**20} MiB; "
                                       "split the document over several lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); "
                                       "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise CalibrationError(f"{path}:{lineno}: expected a string or an object with a \"text\" string")
            docs.append(text)
            chars += len(text)
    return _cut(docs, max_chars)


def _read_parquet(path: Path) -> Iterator[str]:
    """The string cells of the 'text' column, read one record batch at a time as they are consumed."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    except Exception as e:
        raise CalibrationError(f"{path} is not a readable parquet file: {first_line(e)}") from None
    if "text" not in columns:
        raise CalibrationError(f"{path} has no 'text' column (columns: {', '.join(columns)})")
    for group in range(parquet.num_row_groups):  # one row group at a time: iter_batches alone reads ahead
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=["text"])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:
                raise CalibrationError(f"{path} is not a readable parquet file: {first_line(e)}") from None
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _read_hf_dataset(spec: str) -> Iterator[str]:
    """The string 'text' of each row of a (cached or downloaded) dataset, row by row as they are consumed: the
    Arrow files stay memory-mapped, and only the rows the budget needs are read."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibrationError(f"bad dataset spec 'hf:{spec}': use hf:<dataset id>[:config][:split]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise CalibrationError(f"cannot load dataset {name!r} (config {config}, split {split}): "
                               f"{first_line(e)}") from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return (row["text"] for row in ds.select_columns(["text"]) if isinstance(row["text"], str))


# Long text is tokenized a piece at a time: a fast tokenizer keeps several hundred bytes of bookkeeping per token
# (offsets, token strings, alignments) until a call returns, so one call on a long text holds many times the text.
# Pieces are cut only at seams checked to change no id (see _seam), so the ids are those of the whole text.
PIECE_CHARS = 1 << 18          # characters per tokenizer call: its bookkeeping stays small beside a layer's
SEAM_WINDOW = 1 << 10          # characters each side of a seam that are tokenized both whole and cut to check it
SEAM_SEARCH = 1 << 14          # how far past a piece's nominal end a seam is looked for
SEAM_TRIES = 16                # candidate seams checked per piece before the text is tokenized whole


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> Tensor:
    """All documents joined by blank lines, tokenized without special tokens: LongTensor [T]. The ids are those of
    one call on the whole text, computed a piece at a time where the tokenizer allows (see _pieces)."""
    text = "\n\n".join(d for d in documents if d.strip())
    if not text:
        return torch.empty(0, dtype=torch.long)
    pieces = _pieces(tokenizer, text)
    ids = [torch.tensor(_ids(tokenizer, text[a:b]), dtype=torch.long) for a, b in zip(pieces, pieces[1:])]
    return torch.cat(ids)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Where to cut `text`: [0, seam, ..., len(text)], a seam about every PIECE_CHARS characters; [0, len] (the
    text whole) where no checked seam is found near a piece's end."""
    cuts = [0]
    while len(text) - cuts[-1] > PIECE_CHARS + SEAM_SEARCH:
        seam = _seam(tokenizer, text, cuts[-1] + PIECE_CHARS)
        if seam is None:
            return [0, len(text)]
        cuts.append(seam)
    return [*cuts, len(text)]


def _seam(tokenizer: PreTrainedTokenizerBase, text: str, start: int) -> int | None:
    """The first position at or after `start` where the text may be cut: a space between a letter or digit and a
    letter, where the tokens of SEAM_WINDOW characters either side equal those of the two sides tokenized apart.
    Pre-tokenizers split there (GPT-2's and Llama 3's regexes; SentencePiece's "▁" words) and never look back
    across a split, so tokens that agree over a window each side agree over the whole text; a tokenizer that
    tokenizes the seams differently fails SEAM_TRIES checks, and its text is tokenized whole."""
    pos, tries, end = start, 0, min(len(text) - 1, start + SEAM_SEARCH)
    while tries < SEAM_TRIES:
        pos = text.find(" ", pos, end)
        if pos < 0:
            return None
        if text[pos - 1].isalnum() and text[pos + 1].isalpha():
            tries += 1
            left, right = text[pos - SEAM_WINDOW:pos], text[pos:pos + SEAM_WINDOW]
            if _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right):
                return pos
        pos += 1
    return None


def calibration_batch(tokenizer: PreTrainedTokenizerBase, spec: CalibSpec) -> Tensor:
    """`spec.samples` non-overlapping windows of `spec.seq_len` tokens, chosen with `spec.seed`: [samples, seq_len]."""
    stream = token_stream(tokenizer, load_documents(spec.source, text_budget(spec.tokens_needed)))
    n_windows = stream.numel() // spec.seq_len
    if n_windows < spec.samples:
        raise CalibrationError(f"calibration set {spec.source!r} has {stream.numel()} tokens; --samples {spec.samples} "
                               f"x --seq-len {spec.seq_len} needs {spec.tokens_needed}")
    g = torch.Generator().manual_seed(spec.seed)
    chosen = torch.randperm(n_windows, generator=g)[: spec.samples].sort().values
    windows = stream[: n_windows * spec.seq_len].view(n_windows, spec.seq_len)
    return windows[chosen].clone()


def evaluation_windows(tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int,
                       max_tokens: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows from the start of an evaluation set: [n, seq_len]."""
    stream = token_stream(tokenizer, load_documents(source, text_budget(max_tokens)))
    n = stream.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise CalibrationError(f"evaluation set {source!r} has {stream.numel()} tokens; need at least {seq_len}")
    return stream[: n * seq_len].view(n, seq_len).clone()

import json

import pytest

from quantkit.config import CalibSpec
from quantkit.errors import CalibrationError
from quantkit.source.calibration import (
    BUILTIN_SETS,
    builtin_dir,
    calibration_batch,
    evaluation_windows,
    load_documents,
)


def test_builtin_sets_exist_and_are_disjoint():
    calib = load_documents("pydocs-calib")
    evals = load_documents("pydocs-eval")
    assert len(calib) > 1000 and len(evals) > 300
    assert not set(calib) & set(evals)
    for f in BUILTIN_SETS.values():
        assert (builtin_dir() / f).is_file()


def test_batch_shape_and_determinism(tiny_tokenizer):
    spec = CalibSpec(samples=4, seq_len=32, seed=1)
    a, b = calibration_batch(tiny_tokenizer, spec), calibration_batch(tiny_tokenizer, spec)
    assert a.shape == (4, 32) and a.equal(b)
    assert not a.equal(calibration_batch(tiny_tokenizer, CalibSpec(samples=4, seq_len=32, seed=2)))


def test_local_txt_jsonl_and_parquet(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": text}) for _ in range(2)))
    pq.write_table(pa.table({"text": [text, text]}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        ids = calibration_batch(tiny_tokenizer, CalibSpec(source=str(tmp_path / name), samples=2, seq_len=16))
        assert ids.shape == (2, 16)


def test_too_short_set_says_found_and_needed(tmp_path, tiny_tokenizer):
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(CalibrationError, match=r"has \d+ tokens; --samples 8 x --seq-len 64 needs 512"):
        calibration_batch(tiny_tokenizer, CalibSpec(source=str(tmp_path / "short.txt"), samples=8, seq_len=64))


def test_empty_set(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CalibrationError, match="has 0 tokens"):
        calibration_batch(tiny_tokenizer, CalibSpec(source=str(tmp_path / "empty.txt"), samples=1, seq_len=8))


def test_bad_files_fail_cleanly(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(CalibrationError, match="not valid UTF-8"):
        load_documents(str(tmp_path / "bad.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(CalibrationError, match="not found"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(CalibrationError, match="unsupported calibration file type"):
        load_documents(str(tmp_path / "a.csv"))


def test_hf_dataset_offline_fails_with_one_line():
    with pytest.raises(CalibrationError, match="cannot load dataset 'no-such/dataset'"):
        load_documents("hf:no-such/dataset")


def test_evaluation_windows_are_consecutive(tiny_tokenizer):
    w = evaluation_windows(tiny_tokenizer, "pydocs-eval", 64, max_tokens=64 * 5)
    assert w.shape == (5, 64)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _trained(pre_tokenizer, decoder):
    """A small BPE tokenizer with the given pre-tokenizer, trained on the calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_documents("pydocs-calib")[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _tokenizers():
    from tokenizers import Regex, decoders, pre_tokenizers

    return {
        "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()),
        "llama3": (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                   decoders.ByteLevel()),
        "prefix-space": (pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()),
        "sentencepiece": (pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                          decoders.Metaspace(replacement="▁", prepend_scheme="first")),
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "prefix-space", "sentencepiece"])
def test_long_text_is_tokenized_in_pieces_with_the_whole_texts_ids(kind, monkeypatch):
    """A long text is tokenized a piece at a time (the tokenizer's per-token bookkeeping stays bounded), cut only
    where that changes no id: the ids equal one call on the whole text, for byte-level BPE tokenizers (cut) and for
    those that mark the start of every call (a prefix space, SentencePiece's "▁", which the seam's space makes a
    no-op)."""
    from quantkit.source import calibration

    tokenizer = _trained(*_tokenizers()[kind])
    monkeypatch.setattr(calibration, "PIECE_CHARS", 20_000)
    monkeypatch.setattr(calibration, "SEAM_SEARCH", 2_000)
    docs = load_documents("pydocs-calib")[:400]
    text = "\n\n".join(d for d in docs if d.strip())
    calls: list[int] = []
    real = calibration._ids
    monkeypatch.setattr(calibration, "_ids", lambda tok, t: calls.append(len(t)) or real(tok, t))
    stream = calibration.token_stream(tokenizer, docs)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream.tolist() == whole
    assert max(calls) <= 22_000 and len(calibration._pieces(tokenizer, text)) > 10  # pieces, not one call


def test_text_with_no_checked_seam_is_tokenized_whole(tiny_tokenizer, monkeypatch):
    """Where no seam passes the check (here: text without spaces), the text goes to the tokenizer in one call."""
    from quantkit.source import calibration

    monkeypatch.setattr(calibration, "PIECE_CHARS", 2_000)
    monkeypatch.setattr(calibration, "SEAM_SEARCH", 500)
    text = "x" * 10_000
    assert calibration._pieces(tiny_tokenizer, text) == [0, len(text)]
    assert calibration.token_stream(tiny_tokenizer, [text]).tolist() == \
        tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

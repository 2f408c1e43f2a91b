"""Property-based tests (hypothesis): the packer, and every way a user can spell the options."""
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quantkit.config import CalibSpec, InvalidSetting, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.write.packing import (
    SUPPORTED_BITS,
    pack_last_dim,
    pack_qweight,
    pack_qzeros,
    packed_length,
    unpack_last_dim,
    unpack_qweight,
    unpack_qzeros,
)

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def lengths(bits: int):
    """Lengths the format can pack: whole int32 words (3-bit: whole 32-value blocks)."""
    step = 32 if bits == 3 else 32 // bits
    return st.integers(0, 20).map(lambda k: k * step)


@st.composite
def codes(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    rows, cols = draw(st.integers(1, 6)), draw(lengths(bits))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    extreme = draw(st.sampled_from(["random", "zeros", "max"]))
    q = {"random": torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32),
         "zeros": torch.zeros(rows, cols, dtype=torch.int32),
         "max": torch.full((rows, cols), 2**bits - 1, dtype=torch.int32)}[extreme]
    return bits, q


@PROFILE
@given(codes())
def test_pack_unpack_is_exact_for_every_packable_shape(case):
    bits, q = case
    packed = pack_last_dim(q, bits)
    assert packed.dtype == torch.int32 and packed.shape[-1] == packed_length(q.shape[-1], bits)
    assert torch.equal(unpack_last_dim(packed, bits, q.shape[-1]), q)
    assert torch.equal(unpack_qweight(pack_qweight(q, bits), bits, q.shape[1]), q)
    assert torch.equal(unpack_qzeros(pack_qzeros(q, bits), bits, q.shape[1]), q)


@PROFILE
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 400))
def test_unpackable_lengths_are_refused_with_the_rule(bits, n):
    assume(n * bits % 32)
    with pytest.raises(ValueError, match=f"{bits}-bit packing needs a length divisible by"):
        pack_last_dim(torch.zeros(2, n, dtype=torch.int32), bits)


@PROFILE
@given(bits=st.sampled_from(SUPPORTED_BITS), bad=st.sampled_from([-1, "max+1"]))
def test_out_of_range_codes_are_refused(bits, bad):
    q = torch.zeros(1, 32, dtype=torch.int32)
    q[0, 7] = -1 if bad == -1 else 2**bits
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_last_dim(q, bits)


# ---- options -----------------------------------------------------------------------------------------------------

QUANTIZE_FLAGS = {"--bits", "--group-size", "--damp", "--static-groups", "--skip", "--method", "--samples", "--seq-len",
                  "--gptaq"}


@PROFILE
@given(bits=st.integers(-3, 20), group_size=st.integers(-300, 5000), damp=st.floats(allow_nan=True, allow_infinity=True),
       act_order=st.booleans(), static_groups=st.booleans(), method=st.sampled_from(["gptq", "rtn", "awq", ""]),
       skip=st.lists(st.text(max_size=12), max_size=3), gptaq=st.booleans())
def test_quant_spec_is_valid_or_names_the_setting(bits, group_size, damp, act_order, static_groups, method, skip,
                                                  gptaq):
    try:
        spec = QuantSpec(bits=bits, group_size=group_size, damp=damp, act_order=act_order, static_groups=static_groups,
                         method=method, skip=tuple(skip), gptaq=gptaq)
    except InvalidSetting as e:
        assert e.flag in QUANTIZE_FLAGS and str(e)
        return
    assert spec.bits in SUPPORTED_BITS and (spec.group_size == -1 or spec.group_size > 0) and 0 < spec.damp < 1
    assert spec.method in ("gptq", "rtn") and not (spec.static_groups and not spec.act_order)
    assert not spec.gptaq or spec.method == "gptq"
    assert spec.effective_group_size(64) >= 1 and QuantSpec(**{**spec.to_dict(), "skip": tuple(spec.skip)}) == spec


@PROFILE
@given(samples=st.integers(-5, 10**6), seq_len=st.integers(-5, 10**5))
def test_calib_spec_is_valid_or_names_the_setting(samples, seq_len):
    try:
        spec = CalibSpec(samples=samples, seq_len=seq_len)
    except InvalidSetting as e:
        assert e.flag in ("--samples", "--seq-len")
        return
    assert spec.tokens_needed == samples * seq_len > 0


option_values = st.fixed_dictionaries({}, optional={
    "--bits": st.sampled_from(["2", "3", "4", "8", "5", "four", "", "4.0"]),
    "--group-size": st.one_of(st.integers(-200, 300).map(str), st.sampled_from(["", "abc", "1e3", "64.5"])),
    "--damp": st.one_of(st.floats(allow_nan=True).map(repr), st.sampled_from(["", "nan", "inf", "-0.0", "1/100"])),
    "--samples": st.one_of(st.integers(-3, 4).map(str), st.sampled_from(["x", ""])),
    "--seq-len": st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["x"])),
    "--skip": st.text(alphabet="abc._*[] ", max_size=6),
    "--method": st.sampled_from(["gptq", "rtn", "GPTQ", "bnb"]),
    "--max-shard-size": st.sampled_from(["2GB", "500mb", "1", "0", "-1GB", "big", ""]),
    "--repo-id": st.text(alphabet="ab./-_\n ", min_size=1, max_size=8),
})
option_flags = st.fixed_dictionaries({}, optional={f: st.just(True) for f in
                                                   ("--static-groups", "--asym", "--no-act-order", "--no-clip-search",
                                                    "--gptaq")})


@pytest.fixture()
def recorded(monkeypatch):
    """The library call the CLI makes, replaced by a recorder: only parsing and validation run."""
    calls = []

    def fake_quantize(model, spec, calib, **kwargs):
        from quantkit.source.hub import validate_repo_id
        from quantkit.write.shards import parse_size

        if kwargs.get("repo_id"):
            validate_repo_id(kwargs["repo_id"])
        try:
            parse_size(kwargs["max_shard_size"])
        except ValueError as e:
            raise QuantkitError(str(e)) from None
        calls.append((spec, calib, kwargs))
        raise QuantkitError("stopped after parsing")

    monkeypatch.setattr("quantkit.run.pipeline.quantize", fake_quantize)
    return calls


@PROFILE
@given(values=option_values, flags=option_flags)
def test_any_option_spelling_parses_or_fails_in_one_line(recorded, tmp_path, values, flags):
    """Whatever the user types, quantize either hands a valid spec to the library or exits 2 (usage) / 1 (bad value)
    with one 'Error:' line naming the problem, never a traceback."""
    args = ["quantize", str(tmp_path)]
    for flag, value in values.items():
        args += [flag, value]
    args += list(flags)
    before = len(recorded)
    r = CliRunner().invoke(__import__("quantkit.cli.app", fromlist=["cli"]).cli, args)
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code in (1, 2) and len(errors) == 1 and "Traceback" not in r.output, r.output
    if r.exit_code == 2:
        assert len(recorded) == before
        assert re.search(r"Invalid value for '?(--[a-z-]+|MODEL)|Option '--[a-z-]+' requires", r.output), r.output
    else:
        spec, calib, kwargs = recorded[-1] if len(recorded) > before else (None, None, None)
        assert spec is None or (spec.bits in SUPPORTED_BITS and calib.samples > 0), r.output


REPO_CHARS = "ab9-_./\\\n %~"
repo_like = st.builds(lambda a, b, tail: f"{a}/{b}{tail}", st.text(REPO_CHARS, min_size=1, max_size=5),
                      st.text(REPO_CHARS, min_size=1, max_size=5), st.sampled_from(["", "\n", "/", "/..", " "]))


@PROFILE
@given(text=st.one_of(repo_like, st.text(REPO_CHARS, max_size=12), st.text(max_size=20)))
def test_a_repo_id_can_never_leave_the_cache(text, tmp_path_factory, monkeypatch):
    from quantkit.source.hub import repo_folder

    cache = tmp_path_factory.getbasetemp() / "hub-props"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    try:
        folder = repo_folder(text)
    except QuantkitError as e:
        assert "invalid repo id" in str(e) and "\n" not in str(e).split(": use")[0].replace(repr(text), "")
        return
    assert folder.parent == Path(cache) and folder.name.startswith("models--") and folder.name.count("--") == 2
    assert "/" not in folder.name and "\n" not in folder.name and ".." not in folder.name


@PROFILE
@given(number=st.integers(1, 10**6), unit=st.sampled_from(["", "B", "KB", "kb", "MB", "mb", "GB", "G", "M", "K"]),
       space=st.sampled_from(["", " "]))
def test_shard_sizes_parse_to_bytes(number, unit, space):
    from quantkit.write.shards import parse_size

    scale = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit.upper()[:1] if unit.upper() != "B" else "B"]
    assert parse_size(f"{number}{space}{unit}") == number * scale


@PROFILE
@given(text=st.text(max_size=10))
def test_shard_size_garbage_is_a_value_error(text):
    from quantkit.write.shards import parse_size

    try:
        n = parse_size(text)
    except ValueError as e:
        assert "size" in str(e)
        return
    assert n > 0 and re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGkmg]?[Bb]?\s*", text)

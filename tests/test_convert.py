"""`quantkit convert`: GPTQ checkpoints repacked into llama.cpp blocks, checked with gguf's own reader and
dequantizer (and transformers' GGUF loader) against the GPTQ checkpoint's own dequantized weights.

The Q4_1 bound: GPTQ's value is scale·(q - zero), exact in float32; the GGUF's is fl32(d·q + m) with
d = scale and m = float16(-scale·zero). They differ by m + scale·zero (the float16 rounding of the min, at most
half a float16 ulp of |scale·zero|) plus the float32 rounding of the sum (at most half a float32 ulp of the
result): |gguf - gptq| <= ulp16(scale·zero)/2 + ulp32(w)/2.
"""
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import cli_run, error_line, listing, make_tiny_model
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file, save_file

import quantkit
from quantkit import CalibSpec, QuantSpec
from quantkit.tools.convert import block_grid, repack
from quantkit.write.gptq_format import dequantize_module, zero_offset
from quantkit.write.packing import pack_qweight, pack_qzeros, unpack_qzeros

CALIB = CalibSpec(samples=8, seq_len=32)
NEAREST = "quantkit quantize BASE --format gguf --gguf-type"


# ---------------------------------------------------------------- references written from llama.cpp's converter
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute (FORMATS.md §3), on the rows of w."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{GGUF name: (ggml type name, float32 values in numpy shape)}, read and dequantized by gguf itself."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(
        [int(d) for d in t.shape])))) for t in reader.tensors}


def half_ulp16(x: torch.Tensor) -> torch.Tensor:
    """Half a float16 ulp at |x| (float64): 2^(e-11) for normal values, 2^-25 below float16's normal range."""
    a = x.double().abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    return torch.where(a >= 2.0**-14, 2.0 ** (e - 11), torch.full_like(a, 2.0**-25))


def half_ulp32(x: torch.Tensor) -> torch.Tensor:
    a = x.double().abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    return torch.where(a >= 2.0**-126, 2.0 ** (e - 24), torch.full_like(a, 2.0**-150))


def gptq_expectations(gptq_dir: Path, bits: int, fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module: (its dequantized GPTQ weight [N, K], the bound of the Q4_1 difference [N, K])}."""
    state = {}
    for f in sorted(gptq_dir.glob("*.safetensors")):
        state |= load_file(f)
    out = {}
    for name in sorted(n for n in state if n.endswith(".qweight")):
        m = name.removesuffix(".qweight")
        qz, s, g = state[f"{m}.qzeros"], state[f"{m}.scales"], state[f"{m}.g_idx"]
        w = dequantize_module(state[name], qz, s, g, bits, fmt)
        zeros = unpack_qzeros(qz, bits, s.shape[1]).t() + zero_offset(fmt)
        min_exact = (s.t().float() * zeros.float())[:, g.long()]
        out[m] = (w, half_ulp16(min_exact) + half_ulp32(w))
    return out


# ---------------------------------------------------------------- pure: random GPTQ tensors
def _random_gptq(n: int, k: int, bits: int, group: int, fmt: str, zeros: str, order: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    per = k if group == -1 else group
    n_groups = math.ceil(k / per)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    scales = (torch.rand(n, n_groups, generator=g) * 0.05 + 1e-3).half()
    if zeros == "middle":
        z = torch.full((n, n_groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(zero_offset(fmt), 2**bits, (n, n_groups), generator=g, dtype=torch.int32)
    g_idx = torch.arange(k) // per
    if order == "blockwise":  # act-order whose groups happen to be whole 32-column blocks, in a shuffled order
        g_idx = g_idx.reshape(-1, 32)[torch.randperm(k // 32, generator=g)].reshape(-1)
    elif order == "permuted":
        g_idx = g_idx[torch.randperm(k, generator=g)]
    stored = pack_qzeros((z - zero_offset(fmt)).t().contiguous(), bits)
    return pack_qweight(codes, bits), stored, scales.t().contiguous(), g_idx.to(torch.int32)


@pytest.mark.parametrize("bits,group,fmt,order", [(4, 32, "gptq", "static"), (4, 64, "gptq_v2", "blockwise"),
                                                  (4, 128, "gptq", "blockwise"), (4, -1, "gptq_v2", "static"),
                                                  (8, 32, "gptq", "static"), (8, 128, "gptq_v2", "blockwise")])
def test_symmetric_groups_repack_bit_for_bit(bits, group, fmt, order):
    qweight, qzeros, scales, g_idx = _random_gptq(24, 256, bits, group, fmt, "middle", order, seed=bits + group)
    data, type_name, rounded = repack(qweight, qzeros, scales, g_idx, bits, fmt)
    assert type_name == ("Q4_0" if bits == 4 else "Q8_0") and not rounded
    got = torch.from_numpy(gguf_dequantize(data, gguf.GGMLQuantizationType[type_name]))
    assert torch.equal(got, dequantize_module(qweight, qzeros, scales, g_idx, bits, fmt))


@pytest.mark.parametrize("group,fmt,order", [(32, "gptq_v2", "static"), (128, "gptq", "blockwise"),
                                             (-1, "gptq_v2", "static")])
def test_asymmetric_groups_differ_by_the_float16_min_only(group, fmt, order):
    qweight, qzeros, scales, g_idx = _random_gptq(64, 256, 4, group, fmt, "random", order, seed=7)
    data, type_name, rounded = repack(qweight, qzeros, scales, g_idx, 4, fmt)
    assert type_name == "Q4_1" and rounded
    got = torch.from_numpy(gguf_dequantize(data, gguf.GGMLQuantizationType.Q4_1)).double()
    want = dequantize_module(qweight, qzeros, scales, g_idx, 4, fmt)
    zeros = unpack_qzeros(qzeros, 4, scales.shape[1]).t() + zero_offset(fmt)
    bound = half_ulp16((scales.t().float() * zeros.float())[:, g_idx.long()]) + half_ulp32(want)
    err = (got - want.double()).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.9  # the bound is tight: some weights lose nearly all of it
    # and the values are exactly the formula: the float32 sum of d*q and the float16 min
    grid, _ = block_grid(qzeros, scales, g_idx, 4, fmt)
    assert torch.equal(grid.fields["m"], (-(scales.t().float() * zeros.float()))[:, g_idx.long()][:, ::32].half())


@pytest.mark.parametrize("bits,zeros,order,reason", [(4, "middle", "permuted", "act-order with permuted groups"),
                                                     (8, "random", "static", "8-bit asymmetric")])
def test_unrepackable_tensors_raise_naming_the_reason(bits, zeros, order, reason):
    parts = _random_gptq(8, 128, bits, 32, "gptq_v2", zeros, order, seed=1)
    with pytest.raises(ValueError, match=reason):
        repack(*parts, bits, "gptq_v2")


def test_a_row_length_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="in_features 48 is not a multiple of 32"):
        block_grid(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8).half(), torch.zeros(48, dtype=torch.int32),
                   4, "gptq")


# ---------------------------------------------------------------- end to end on tiny checkpoints
@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("convert") / "base", tiny_tokenizer)


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory, tiny_tokenizer):
    """GPTQ checkpoints quantkit writes, made once each on demand."""
    root, made = tmp_path_factory.mktemp("gptq"), {}
    bases = {"qwen2-sym4": lambda: make_tiny_model(root / "qwen2-base", tiny_tokenizer, model_type="qwen2",
                                                   vocab_size=544)}  # transformers' Qwen2Tokenizer adds a token
    specs = {
        "sym4-g32": QuantSpec(method="rtn", bits=4, group_size=32, sym=True),
        "sym4-g128": QuantSpec(method="rtn", bits=4, group_size=128, sym=True),
        "static-g64": QuantSpec(method="gptq", bits=4, group_size=64, sym=True, act_order=True, static_groups=True),
        "sym8-g32": QuantSpec(method="rtn", bits=8, group_size=32, sym=True),
        "asym4-g32": QuantSpec(method="rtn", bits=4, group_size=32, sym=False),
        "mixed": QuantSpec(method="rtn", bits=4, group_size=32, sym=True, skip=("mlp.down_proj",), lm_head=True),
        "g16": QuantSpec(method="rtn", bits=4, group_size=16, sym=True),
        "act-order": QuantSpec(method="gptq", bits=4, group_size=32, sym=True, act_order=True),
        "3bit": QuantSpec(method="rtn", bits=3, group_size=32, sym=True),
        "asym8": QuantSpec(method="rtn", bits=8, group_size=32, sym=False),
        "qwen2-sym4": QuantSpec(method="rtn", bits=4, group_size=32, sym=True),
    }

    def get(name: str) -> Path:
        if name not in made:
            source = bases[name]() if name in bases else base
            made[name] = Path(quantkit.quantize(str(source), specs[name], CALIB, out=root / name).path)
        return made[name]

    return get


def _convert_and_compare(gptq_dir: Path, out: Path, config: dict) -> tuple[dict, dict]:
    r = cli_run("convert", gptq_dir, out)
    assert r.exit_code == 0, r.output
    qc = config["quantization_config"]
    expected = gptq_expectations(gptq_dir, qc["bits"], qc["checkpoint_format"])
    tensors = gguf_tensors(out)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    compared = {}
    for module, (w, bound) in expected.items():
        type_name, values = tensors[name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))]
        if module.endswith("q_proj"):
            w, bound = llama_permute(w, config["num_attention_heads"]), llama_permute(bound, config["num_attention_heads"])
        elif module.endswith("k_proj"):
            w, bound = llama_permute(w, config["num_key_value_heads"]), llama_permute(bound, config["num_key_value_heads"])
        compared[module] = (type_name, torch.from_numpy(values), w, bound)
    return compared, tensors


@pytest.mark.parametrize("variant,block", [("sym4-g32", "Q4_0"), ("sym4-g128", "Q4_0"), ("static-g64", "Q4_0"),
                                           ("sym8-g32", "Q8_0")])
def test_symmetric_checkpoints_convert_bit_for_bit(variant, block, checkpoints, tmp_path):
    gptq_dir = checkpoints(variant)
    config = json.loads((gptq_dir / "config.json").read_text())
    out = tmp_path / "model.gguf"
    compared, tensors = _convert_and_compare(gptq_dir, out, config)
    assert len(compared) == 14
    for module, (type_name, got, want, _) in compared.items():
        assert type_name == block, module
        assert torch.equal(got, want), module
    floats = {name: t for name, (t, _) in tensors.items() if t in ("F16", "F32")}
    assert floats == {"token_embd.weight": "F16", "output.weight": "F16", "output_norm.weight": "F32",
                      **{f"blk.{i}.{n}_norm.weight": "F32" for i in range(2) for n in ("attn", "ffn")}}
    assert cli_run("convert", gptq_dir, out).exit_code == 1  # it exists now: replaced only with --overwrite
    r = cli_run("convert", gptq_dir, out, "--overwrite")
    assert r.exit_code == 0 and r.output.strip() == f"wrote {out} (21 tensors: 14 {block}, 2 F16, 5 F32; lossless)"


def test_asymmetric_checkpoint_converts_within_the_float16_min(checkpoints, tmp_path):
    gptq_dir = checkpoints("asym4-g32")
    config = json.loads((gptq_dir / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    compared, _ = _convert_and_compare(gptq_dir, tmp_path / "asym.gguf", config)
    differ, ratio = 0, 0.0
    for module, (type_name, got, want, bound) in compared.items():
        assert type_name == "Q4_1", module
        err = (got.double() - want.double()).abs()
        assert bool((err <= bound).all()), module
        differ += int(not torch.equal(got, want))
        ratio = max(ratio, float((err / bound).max()))
    assert differ > 0 and ratio > 0.5  # some tensors differ, none by more than the bound, and it is tight
    r = cli_run("convert", gptq_dir, tmp_path / "asym.gguf", "--overwrite")
    assert f"min rounded to float16 in {differ} tensors)" in r.output


def test_mixed_checkpoint_keeps_float_linears_and_quantizes_the_head(checkpoints, tmp_path):
    gptq_dir = checkpoints("mixed")
    config = json.loads((gptq_dir / "config.json").read_text())
    compared, tensors = _convert_and_compare(gptq_dir, tmp_path / "mixed.gguf", config)
    assert len(compared) == 13 and "lm_head" in compared  # 6 per layer (down_proj kept) and the head
    for module, (type_name, got, want, _) in compared.items():
        assert type_name == "Q4_0" and torch.equal(got, want), module
    state = load_file(next(gptq_dir.glob("*.safetensors")))
    for i in range(2):
        type_name, values = tensors[f"blk.{i}.ffn_down.weight"]
        assert type_name == "F16"
        assert torch.equal(torch.from_numpy(values), state[f"model.layers.{i}.mlp.down_proj.weight"].float())
    assert tensors["output.weight"][0] == "Q4_0" and tensors["token_embd.weight"][0] == "F16"


# the same weights give the same logits, bit for bit; Q4_1's float16 mins move them by less than atol
@pytest.mark.slow
@pytest.mark.parametrize("variant,atol", [("sym4-g32", 0.0), ("sym8-g32", 0.0), ("mixed", 0.0), ("qwen2-sym4", 0.0),
                                          ("asym4-g32", 1e-3)])
def test_transformers_loads_the_file_with_the_checkpoints_logits(variant, atol, checkpoints, tmp_path):
    from conftest import float_model
    from transformers import AutoModelForCausalLM

    gptq_dir = checkpoints(variant)
    r = cli_run("convert", gptq_dir, tmp_path / "m.gguf")
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("; lossless)") == (atol == 0.0)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    reference = float_model(gptq_dir, "gptq")
    assert loaded.config.model_type == reference.config.model_type
    assert loaded.config.vocab_size == reference.config.vocab_size and loaded.config.num_key_value_heads == 2
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


# ---------------------------------------------------------------- refusals: one line, exit 1, nothing written
def _refused(source: Path, out: Path, *extra: str) -> str:
    before = sorted(p.name for p in out.parent.iterdir())
    r = cli_run("convert", source, out, *extra)
    assert r.exit_code == 1, r.output
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no OUT, no temporary left beside it
    return error_line(r)


@pytest.mark.parametrize("variant,reason,gguf_type", [
    ("g16", "group size 16 is not a multiple of 32", "Q4_0"),
    ("act-order", "act-order with permuted groups", "Q4_0"),
    ("3bit", "bits 3: no llama.cpp block holds 3-bit GPTQ groups exactly", "Q4_K_M"),
    ("asym8", "8-bit asymmetric (zero points other than 128)", "Q8_0"),
])
def test_settings_without_a_lossless_repack_are_refused(variant, reason, gguf_type, checkpoints, tmp_path):
    line = _refused(checkpoints(variant), tmp_path / "x.gguf")
    assert reason in line and line.endswith(f"{NEAREST} {gguf_type}"), line


def test_other_formats_are_refused(base, checkpoints, tmp_path):
    assert "is not quantized" in _refused(base, tmp_path / "x.gguf")
    for key, value, reason in (("quant_method", "awq", "format 'awq'"),
                               ("checkpoint_format", "marlin", "format checkpoint_format 'marlin'")):
        other = tmp_path / value
        shutil.copytree(checkpoints("sym4-g32"), other)
        (other / "quantkit.json").unlink()
        config = json.loads((other / "config.json").read_text())
        config["quantization_config"][key] = value
        (other / "config.json").write_text(json.dumps(config))
        (other / "quantize_config.json").unlink()
        line = _refused(other, tmp_path / "x.gguf")
        assert reason in line and line.endswith(f"{NEAREST} Q4_0"), line


def test_a_damaged_checkpoint_is_refused_before_anything_is_written(checkpoints, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints("sym4-g32"), damaged)
    (damaged / "quantkit.json").unlink()
    shard = next(damaged.glob("*.safetensors"))
    state = load_file(shard)
    state["model.layers.1.mlp.up_proj.g_idx"][5] = 99
    save_file(state, shard, metadata={"format": "pt"})
    line = _refused(damaged, tmp_path / "x.gguf")
    assert "integrity check failed" in line and "model.layers.1.mlp.up_proj.g_idx" in line


def test_a_cached_repo_id_converts(base, tmp_path):
    quantkit.quantize(str(base), QuantSpec(method="rtn", bits=4, group_size=64), repo_id="test/tiny-convert-g64")
    r = cli_run("convert", "test/tiny-convert-g64", tmp_path / "cached.gguf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"path": str(tmp_path / "cached.gguf"), "tensors": 21, "lossless": True,
                                    "types": {"Q4_0": 14, "F32": 5, "F16": 2}, "min_rounded": []}


def test_the_output_must_be_a_new_gguf_file_or_replace_one(checkpoints, tmp_path):
    gptq_dir = checkpoints("sym4-g32")
    assert "named *.gguf" in _refused(gptq_dir, tmp_path / "model.bin")
    taken = tmp_path / "taken.gguf"
    taken.write_text("not a gguf file")
    assert "already exists; pass --overwrite" in _refused(gptq_dir, taken)
    assert "is not a GGUF file" in _refused(gptq_dir, taken, "--overwrite")
    assert taken.read_text() == "not a gguf file"


# ---------------------------------------------------------------- the tokenizer files it reads, its temporary file
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _with_template(checkpoint: Path, folder: Path, template: Path | str) -> Path:
    """A copy of `checkpoint` whose chat template is chat_template.jinja: `template` written in, or a link to it."""
    shutil.copytree(checkpoint, folder)
    (folder / "quantkit.json").unlink()  # its file list no longer holds: the copy gains files
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)  # else it, not chat_template.jinja, is the template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    target = folder / "chat_template.jinja"
    target.unlink(missing_ok=True)
    target.symlink_to(template) if isinstance(template, Path) else target.write_text(template)
    return folder


def test_a_chat_template_linking_outside_the_checkpoint_is_refused(checkpoints, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-KEY-0123")
    folder = _with_template(checkpoints("sym4-g32"), tmp_path / "linked", secret)
    (tmp_path / "out").mkdir()
    line = _refused(folder, tmp_path / "out" / "x.gguf")
    assert line == f"Error: {folder / 'chat_template.jinja'} is a link to {secret}, outside the model; quantkit " \
                   "copies only files that belong to the model into its output"
    assert listing(tmp_path / "out") == []


def test_the_checkpoints_chat_template_lands_in_the_file_and_nothing_beside_it(checkpoints, tmp_path):
    folder = _with_template(checkpoints("sym4-g32"), tmp_path / "templated", TEMPLATE)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-KEY-0123")
    (folder / "additional_chat_templates").mkdir()  # gguf's SpecialVocab reads *.jinja here, links followed
    (folder / "additional_chat_templates" / "tool_use.jinja").symlink_to(secret)
    out = tmp_path / "t.gguf"
    r = cli_run("convert", folder, out)
    assert r.exit_code == 0, r.output
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.chat_template"].contents() == TEMPLATE
    assert fields["general.name"].contents() == "templated"  # named after the checkpoint, not the copy
    assert b"SECRET-KEY" not in out.read_bytes()


def test_a_killed_converts_partial_file_is_replaced_and_removed(checkpoints, tmp_path):
    from quantkit.tools.convert import lock_path, partial_path

    out = tmp_path / "model.gguf"
    partial_path(out).write_bytes(b"GGUF" + bytes(1 << 20))  # what a convert killed while writing leaves
    r = cli_run("convert", checkpoints("sym4-g32"), out)
    assert r.exit_code == 0, r.output
    assert listing(tmp_path) == sorted([out.name, lock_path(out).name])  # the partial is gone; the empty lock stays
    assert lock_path(out).stat().st_size == 0
    assert len(gguf.GGUFReader(out).tensors) == 21


def test_a_second_convert_to_the_same_file_is_refused_while_one_runs(checkpoints, tmp_path):
    from quantkit.tools.convert import lock_path
    from quantkit.write.publish import exclusive

    out = tmp_path / "model.gguf"
    with exclusive(lock_path(out), "the test's convert"):  # a convert to OUT holds it while it writes
        r = cli_run("convert", checkpoints("sym4-g32"), out)
    assert r.exit_code == 1
    assert error_line(r) == f"Error: another quantkit run is writing {out} (lock {lock_path(out)}); wait for it " \
                            "to finish"
    assert listing(tmp_path) == [lock_path(out).name]

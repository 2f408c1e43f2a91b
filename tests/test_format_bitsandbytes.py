"""quantkit/formats/bitsandbytes.py: bitsandbytes' own 4-bit and 8-bit checkpoints read back in pure torch, against
bitsandbytes' dequantizers, a bitsandbytes-loaded model, and damaged copies."""
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.formats import registry
from quantkit.formats.bitsandbytes import FORMAT, QUANT_STATE
from quantkit.formats.view import DequantizedCheckpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

Q_PROJ = "model.layers.0.self_attn.q_proj"
TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "All that glitters is not gold, and a watched pot never boils. ") * 12


def open_view(path: Path) -> DequantizedCheckpoint:
    assert registry.detect_format(path) == FORMAT
    return registry.open_view(path, FORMAT)


def bnb_config(kind: str, storage: torch.dtype = torch.uint8):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind.split("-")[0],
                              bnb_4bit_use_double_quant=kind.endswith("-nested"), bnb_4bit_compute_dtype=torch.float16,
                              bnb_4bit_quant_storage=storage)


def save_layer(tmp_path: Path, kind: str, weight: torch.Tensor, storage: torch.dtype = torch.uint8):
    """One Linear quantized by bitsandbytes' own modules, saved as transformers saves them (the module's
    state_dict in safetensors, quantization_config in config.json); returns the folder and the module."""
    import bitsandbytes as bnb

    n_out, n_in = weight.shape
    if kind == "int8":
        lin = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, nested = kind.split("-")[0], kind.endswith("-nested")
        lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=weight.dtype, compress_statistics=nested,
                                quant_type=quant_type, quant_storage=storage)
        lin.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested, quant_type=quant_type,
                                       blocksize=64, quant_storage=storage)
    lin = lin.to("cpu")
    out = tmp_path / kind
    out.mkdir()
    save_file({f"{Q_PROJ}.{k}": v.contiguous() for k, v in lin.state_dict().items()}, out / "model.safetensors")
    qcfg = {**bnb_config(kind, storage).to_dict(), "quant_method": "bitsandbytes"}
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qcfg}))
    return out, lin


@pytest.mark.parametrize("shape", [(256, 512), (30, 50), (33, 35)])  # many nested blocks; a short last block; odd
@pytest.mark.parametrize("kind", ["nf4", "nf4-nested", "fp4", "fp4-nested"])
def test_4bit_matches_bitsandbytes_dequantize(kind, shape, tmp_path):
    import bitsandbytes.functional as F

    torch.manual_seed(1)
    path, lin = save_layer(tmp_path, kind, torch.randn(shape, dtype=torch.float16) * 0.05)
    view = open_view(path)
    got = view.get(f"{Q_PROJ}.weight")
    ref = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert ref.dtype == torch.float16 and got.dtype == torch.float32 and view.shape(f"{Q_PROJ}.weight") == shape
    # equal values; bitwise up to the sign of zero: bitsandbytes' own CPU kernels give FP4's code 8 as +0.0 in their
    # vectorized path and -0.0 in their scalar one (rows of 100 columns here), and quantkit gives its table's +0.0
    assert torch.equal(got, ref.float())
    nonzero = ref != 0
    assert torch.equal(got[nonzero].view(torch.int32), ref.float()[nonzero].view(torch.int32))
    if kind.startswith("nf4"):
        assert torch.equal(got.view(torch.int32), ref.float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_4bit_rounds_to_the_quant_states_dtype(dtype, tmp_path):
    import bitsandbytes.functional as F

    torch.manual_seed(2)
    path, lin = save_layer(tmp_path, "nf4-nested", torch.randn(64, 128, dtype=dtype))
    ref = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert ref.dtype == dtype
    assert torch.equal(open_view(path).get(f"{Q_PROJ}.weight").view(torch.int32), ref.float().view(torch.int32))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.int8])
def test_4bit_codes_stored_in_another_dtype(storage, tmp_path):
    """bnb_4bit_quant_storage: the packed bytes kept as another dtype's elements ([bytes / itemsize, 1])."""
    import bitsandbytes.functional as F

    torch.manual_seed(4)
    path, lin = save_layer(tmp_path, "fp4", torch.randn(30, 52, dtype=torch.float16), storage)
    assert lin.weight.data.dtype == storage
    ref = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(open_view(path).get(f"{Q_PROJ}.weight"), ref.float())


@pytest.mark.parametrize("shape", [(64, 128), (30, 50)])
def test_int8_matches_bitsandbytes_dequantize_bit_for_bit(shape, tmp_path):
    import bitsandbytes.functional as F

    torch.manual_seed(3)
    path, lin = save_layer(tmp_path, "int8", torch.randn(shape, dtype=torch.float16))
    got = open_view(path).get(f"{Q_PROJ}.weight")
    ref = F.int8_vectorwise_dequant(lin.weight.data, lin.weight.SCB)
    assert ref.dtype == torch.float32 and torch.equal(got.view(torch.int32), ref.view(torch.int32))


@pytest.fixture(scope="module")
def bnb_models(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (weights drawn wide enough that 4-bit rounding moves its perplexity by a few percent) and its
    copies quantized by transformers + bitsandbytes while loading, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    out = {"base": make_tiny_model(tmp_path_factory.mktemp("base"), tiny_tokenizer, initializer_range=0.2)}
    for kind in ("nf4", "int8"):
        model = AutoModelForCausalLM.from_pretrained(str(out["base"]), quantization_config=bnb_config(kind),
                                                     dtype=torch.float16, device_map="cpu")
        out[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(out[kind]))
    return out


def float_model(path: Path):
    """A float transformers model whose every tensor comes from the bitsandbytes view of `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    view = open_view(path)
    state = {name: view.get(name).float() for name in view.names()}
    view.close()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_view_model_matches_the_bitsandbytes_model(kind, bnb_models, tiny_tokenizer):
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    from quantkit.run.bnb import load_bnb

    ours, theirs = float_model(bnb_models[kind]), load_bnb(bnb_models[kind])
    quantized = [(n, m) for n, m in theirs.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(quantized) == 14  # 7 Linears in each of 2 layers; lm_head stays float
    for name, module in quantized:  # before any forward, which may repack the 4-bit weights for the CPU kernels
        assert torch.equal(ours.get_parameter(f"{name}.weight"),
                           dequantize_bnb_weight(module.weight, getattr(module, "state", None)).float()), name
    ids = torch.tensor(tiny_tokenizer(TEXT)["input_ids"][:256]).view(2, 128)
    ppl_ours, ppl_bnb = perplexity(ours, ids), perplexity(theirs, ids)
    assert abs(ppl_ours / ppl_bnb - 1) < 0.01, (ppl_ours, ppl_bnb)


def edit_quant_state(value: dict | bytes):
    def edit(t: dict) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        t[f"{Q_PROJ}.{QUANT_STATE}nf4"] = torch.tensor(list(raw), dtype=torch.uint8)
    return edit


def state_of(t: dict) -> dict:
    return json.loads(bytes(t[f"{Q_PROJ}.{QUANT_STATE}nf4"].tolist()))


DAMAGE = {
    "json-garbage": ("nf4", edit_quant_state(b'{"quant_type": "nf4", '),
                     "weight.quant_state.bitsandbytes__nf4 is not valid JSON"),
    "json-not-utf8": ("nf4", edit_quant_state(b"\xff\xfe"), "weight.quant_state.bitsandbytes__nf4 is not UTF-8 text"),
    "json-wrong-shape": ("nf4", lambda t: edit_quant_state({**state_of(t), "shape": [64, 32]})(t),
                         "weight is [2048, 1], its quant_state's shape [64, 32] packs into 1024 bytes"),
    "json-shape-not-2d": ("nf4", lambda t: edit_quant_state({**state_of(t), "shape": [4096]})(t),
                          "shape [4096] is not a Linear's [out, in]"),
    "json-unknown-key": ("nf4", lambda t: edit_quant_state({**state_of(t), "code": "x"})(t),
                         "holds the key 'code', which bitsandbytes does not write"),
    "json-bad-blocksize": ("nf4", lambda t: edit_quant_state({**state_of(t), "blocksize": 48})(t),
                           "blocksize 48 is not one of 32, 64"),
    "json-other-type": ("nf4", lambda t: edit_quant_state({**state_of(t), "quant_type": "fp4"})(t),
                        "says quant_type 'fp4', its name says nf4"),
    "json-half-nested": ("nf4", lambda t: edit_quant_state({**state_of(t), "nested_blocksize": 256})(t),
                         "has nested_blocksize but not nested_dtype"),
    "absmax-length": ("nf4", lambda t: t.update({f"{Q_PROJ}.weight.absmax": t[f"{Q_PROJ}.weight.absmax"][:-1]}),
                      "weight.absmax is [63], expected [64] (one per 64 of the [64, 64] weight)"),
    "absmax-dtype": ("nf4", lambda t: t.update({f"{Q_PROJ}.weight.absmax": t[f"{Q_PROJ}.weight.absmax"].half()}),
                     "weight.absmax is float16, expected float32"),
    "quant-map-other": ("nf4", lambda t: t[f"{Q_PROJ}.weight.quant_map"].mul_(2),
                        "weight.quant_map differs from bitsandbytes' nf4 table"),
    "stray-nested": ("nf4", lambda t: t.update({f"{Q_PROJ}.weight.nested_absmax": torch.ones(1)}),
                     "weight.nested_absmax is present, but the quant_state describes no nested absmax"),
    "missing-quant-map": ("nf4", lambda t: t.pop(f"{Q_PROJ}.weight.quant_map"),
                          f"tensor {Q_PROJ}.weight.quant_map is missing from the checkpoint"),
    "scb-length": ("int8", lambda t: t.update({f"{Q_PROJ}.SCB": t[f"{Q_PROJ}.SCB"][:-1]}),
                   "SCB is [63], expected [64] (one absmax per row of the [64, 64] weight)"),
    "int8-dtype": ("int8", lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"].view(torch.uint8)}),
                   "weight is uint8, expected int8"),
    "weight-format": ("int8", lambda t: t[f"{Q_PROJ}.weight_format"].fill_(1),
                      "weight_format is 1; bitsandbytes reads only 0 (row-major)"),
    "missing-weight": ("int8", lambda t: t.pop(f"{Q_PROJ}.weight"),
                       f"tensor {Q_PROJ}.weight is missing from the checkpoint"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_copy_raises_one_line(case, bnb_models, tmp_path):
    kind, damage, message = DAMAGE[case]
    copy = tmp_path / "copy"
    shutil.copytree(bnb_models[kind], copy)
    tensors = load_file(copy / "model.safetensors")
    damage(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantkitError) as e:
        open_view(copy).get(f"{Q_PROJ}.weight")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    if "missing" not in case:
        assert str(e.value).startswith(f"{Q_PROJ}: "), str(e.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"load_in_8bit": True}, "load_in_4bit and load_in_8bit are both True"),
    ({"load_in_4bit": False}, "load_in_4bit and load_in_8bit are both False"),
    ({"load_in_4bit": "yes"}, "'load_in_4bit' is \"yes\", expected a boolean"),
    ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type 'int4' is not one of nf4, fp4"),
    ({"bnb_4bit_quant_storage": "int64"}, "bnb_4bit_quant_storage 'int64' is not one of"),
])
def test_bad_quantization_config_raises_one_line(change, message, bnb_models, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bnb_models["nf4"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(change)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError) as e:
        open_view(copy)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_integrity_accepts_codes_stored_in_another_dtype(tmp_path):
    """The integrity check reads what the reader reads: bnb_4bit_quant_storage bfloat16 is not damage."""
    from quantkit.source.checkpoint import SafetensorsCheckpoint
    from quantkit.verification.format_checks import check_view
    from quantkit.verification.integrity import read_headers
    from quantkit.verification.integrity_report import IntegrityReport

    path, _ = save_layer(tmp_path, "nf4", torch.randn(30, 52, dtype=torch.float16), torch.bfloat16)
    report = IntegrityReport(path=str(path))
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    check_view(path, FORMAT, qcfg, read_headers(SafetensorsCheckpoint(path)), report)
    assert report.ok, report.errors
    assert report.quantized_modules == 1 and report.quantization["quant_storage"] == "bfloat16"

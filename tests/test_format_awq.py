"""AWQ GEMM (quantkit/formats/awq.py): every weight quantkit dequantizes equals GPTQModel's own `dequantize_gemm`
bit for bit, on random tensors packed in AutoAWQ's order and on a tiny Llama that GPTQModel 7.6 quantizes with AWQ on
CPU; the float model built from the view has transformers' perplexity for that artifact; damaged copies and
unsupported settings fail with one line naming the tensor or the key."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import float_model, make_tiny_model, nll
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.formats import awq
from quantkit.formats.registry import detect_format, open_view

MODULE = "model.layers.0.mlp.up_proj"


def gptqmodel_packing():
    """GPTQModel's awq/utils/packing_utils.py (AutoAWQ's, extended), loaded on its own: it needs only torch, and
    importing the gptqmodel package would change this process's environment."""
    spec = importlib.util.find_spec("gptqmodel")
    if spec is None or spec.origin is None:
        pytest.skip("gptqmodel is not installed")
    path = Path(spec.origin).parent / "quantization" / "awq" / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("gptqmodel_awq_packing", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def autoawq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop (awq/modules/linear/gemm.py), for [rows, cols] codes."""
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(codes.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + order_map[i]] << (i * 4)
    return packed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size, n_in, n_out", [(32, 64, 48), (128, 256, 64), (-1, 96, 16)])
def test_random_tensors_equal_gptqmodel_dequantize_gemm(dtype, group_size, n_in, n_out):
    packing = gptqmodel_packing()
    g = torch.Generator().manual_seed(n_in + n_out)
    groups = 1 if group_size == -1 else n_in // group_size
    codes = torch.randint(0, 16, (n_in, n_out), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, n_out), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n_out, generator=g) * 0.02 + 1e-3).to(dtype)
    qweight, qzeros = packing.pack_awq(codes, zeros, 4)
    assert torch.equal(qweight, autoawq_pack(codes)) and torch.equal(qzeros, autoawq_pack(zeros))  # AutoAWQ's order
    reference = packing.dequantize_gemm(qweight, qzeros, scales, 4, n_in // groups)         # [in, out], dtype
    layout = awq.layout({"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm"})
    got = layout.dequantize({"qweight": qweight, "qzeros": qzeros, "scales": scales})
    assert got.dtype == torch.float32 and torch.equal(got, reference.t().float())
    shapes = {"qweight": tuple(qweight.shape), "qzeros": tuple(qzeros.shape), "scales": tuple(scales.shape)}
    assert layout.weight_shape(shapes) == (n_out, n_in)


# --- a small hand-packed checkpoint, and damaged copies of it ------------------------------------------------------

QCFG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


@pytest.fixture()
def packed_dir(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 32), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 32), generator=g, dtype=torch.int32)
    tensors = {f"{MODULE}.qweight": autoawq_pack(codes), f"{MODULE}.qzeros": autoawq_pack(zeros),
               f"{MODULE}.scales": (torch.rand(2, 32, generator=g) * 0.02).half(), "model.norm.weight": torch.ones(64)}
    path = tmp_path / "awq"
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": QCFG}))
    return path


def rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_view_reads_the_packed_checkpoint(packed_dir):
    assert detect_format(packed_dir) == "awq"
    view = open_view(packed_dir, "awq")
    assert view.names() == ["model.norm.weight", f"{MODULE}.weight"] and view.shape(f"{MODULE}.weight") == (32, 64)
    assert view.get(f"{MODULE}.weight").dtype == torch.float32


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_scales_of_the_wrong_shape(packed_dir):
    rewrite(packed_dir, lambda t: t.__setitem__(f"{MODULE}.scales", torch.ones(3, 32, dtype=torch.float16)))
    with pytest.raises(QuantkitError) as e:
        open_view(packed_dir, "awq").shape(f"{MODULE}.weight")
    assert one_line(e) == (f"{MODULE}: scales [3, 32] and qzeros [2, 4] do not hold 2 groups of 64 inputs "
                           "(group_size 32)")


def test_scales_of_a_dtype_awq_does_not_write(packed_dir):
    rewrite(packed_dir, lambda t: t.__setitem__(f"{MODULE}.scales", t[f"{MODULE}.scales"].float()))
    with pytest.raises(QuantkitError) as e:
        open_view(packed_dir, "awq").get(f"{MODULE}.weight")
    assert one_line(e) == f"{MODULE}: scales are torch.float32, expected torch.float16 or torch.bfloat16"


def test_a_missing_part(packed_dir):
    rewrite(packed_dir, lambda t: t.pop(f"{MODULE}.qzeros"))
    with pytest.raises(QuantkitError) as e:
        open_view(packed_dir, "awq")
    assert one_line(e) == (f"tensor {MODULE}.qzeros is missing from the checkpoint (awq stores qweight, qzeros, "
                           "scales for each quantized Linear)")


def test_activation_scales_are_refused(packed_dir):
    """AutoAWQ's ScaledActivation divides an MLP's activation by these; a float model of the base cannot."""
    rewrite(packed_dir, lambda t: t.__setitem__("model.layers.0.mlp.act.scales", torch.ones(32, dtype=torch.float16)))
    with pytest.raises(QuantkitError) as e:
        open_view(packed_dir, "awq")
    assert one_line(e) == ("tensor model.layers.0.mlp.act.scales: awq checkpoints holding such tensors are not read by "
                           "quantkit")


@pytest.mark.parametrize("change, message", [
    ({"version": "gemv"}, "quantization_config.version = 'gemv': quantkit reads AWQ's 'gemm' packing only (GEMV and "
                          "the Marlin/ExLlama repacks store the codes in other orders)"),
    ({"version": None, "format": "gemv_fast"}, "quantization_config.format = 'gemv_fast': quantkit reads AWQ's 'gemm' "
                                               "packing only (GEMV and the Marlin/ExLlama repacks store the codes in "
                                               "other orders)"),
    ({"bits": 8}, "quantization_config.bits = 8: quantkit reads 4-bit AWQ GEMM checkpoints only"),
    ({"bits": "4"}, "quantization_config: 'bits' is \"4\", expected a number"),
    ({"group_size": 0}, "quantization_config.group_size = 0: expected a positive size or -1 (per column)"),
    ({"desc_act": True}, "quantization_config.desc_act = true: AWQ GEMM stores no act-order (g_idx) and quantkit "
                         "reads none"),
])
def test_unsupported_settings_are_refused(packed_dir, change, message):
    config = json.loads((packed_dir / "config.json").read_text())
    config["quantization_config"].update(change)
    (packed_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError) as e:
        open_view(packed_dir, "awq")
    assert one_line(e) == message


# --- GPTQModel's AWQ on a tiny Llama, loaded back by transformers ----------------------------------------------------

# In a child process (GPTQModel sets environment variables and prints banners on import): AWQ with zero points
# (zero_point true) and symmetric (zero_point false), each saved, loaded by transformers on CPU (GPTQModel's torch
# AWQ kernel) and scored on the same tokens. AWQ_TORCH is the backend GPTQModel packs with on a CPU.
PEER = """
import json, sys, torch
from pathlib import Path
base, out = sys.argv[1], Path(sys.argv[2])
from gptqmodel import GPTQModel, QuantizeConfig
from gptqmodel.utils.backend import BACKEND
from transformers import AutoModelForCausalLM
g = torch.Generator().manual_seed(0)
rows = [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(8)]
ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
result = {"ids": ids.tolist()}
for name, sym in (("asym", False), ("sym", True)):
    config = QuantizeConfig(bits=4, group_size=32, sym=sym, quant_method="awq", format="gemm")
    model = GPTQModel.load(base, config, device="cpu")
    model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1,
                   backend=BACKEND.AWQ_TORCH)
    model.save(str(out / name))
    hf = AutoModelForCausalLM.from_pretrained(out / name, device_map="cpu").eval()
    with torch.no_grad():
        logits = hf(ids).logits.float()
    result[name] = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
(out / "result.json").write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def peer(tiny_tokenizer, tmp_path_factory) -> Path:
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed")
    # 4 KV heads: GPTQModel's AWQ clip search needs out_features divisible by 64; a wider init gives peaked logits,
    # so that a wrong dequantization shows in the perplexity
    base = make_tiny_model(tmp_path_factory.mktemp("awq-base"), tiny_tokenizer, num_key_value_heads=4,
                           initializer_range=0.2)
    out = tmp_path_factory.mktemp("awq-peer")
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", PEER, str(base), str(out)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=out)  # GPTQModel writes a logs/ folder where it runs
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, zero_point", [("asym", True), ("sym", False)])
def test_gptqmodel_awq_checkpoint_reads_bit_for_bit(peer, name, zero_point):
    path, packing = peer / name, gptqmodel_packing()
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert detect_format(path) == "awq" and qcfg["version"] == "gemm" and qcfg["zero_point"] is zero_point
    view, stored = open_view(path, "awq"), load_file(path / "model.safetensors")
    assert view.layout.settings == {"bits": 4, "group_size": 32, "zero_point": zero_point, "version": "gemm"}
    assert len(view.modules) == 14 and not any(n.endswith(("qweight", "qzeros", "scales")) for n in view.names())
    for module in view.modules:
        t = {s: stored[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales")}
        reference = packing.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 32)
        assert torch.equal(view.get(f"{module}.weight"), reference.t().float()), module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["asym", "sym"])
def test_view_model_perplexity_matches_transformers(peer, name):
    result = json.loads((peer / "result.json").read_text())
    ids = torch.tensor(result["ids"])
    ours = nll(float_model(peer / name, "awq"), ids)
    assert abs(math.exp(ours - result[name]) - 1) < 0.01, (math.exp(ours), math.exp(result[name]))


@pytest.mark.slow
def test_a_wrong_nibble_order_would_show_in_the_perplexity(peer, monkeypatch):
    """The perplexity check above can fail: read in plain nibble order, the same artifact is far off."""
    result = json.loads((peer / "result.json").read_text())
    monkeypatch.setattr(awq, "AWQ_REVERSE_ORDER", tuple(range(8)))
    wrong = nll(float_model(peer / "asym", "awq"), torch.tensor(result["ids"]))
    assert abs(math.exp(wrong - result["asym"]) - 1) > 0.03


@pytest.mark.slow
def test_a_damaged_artifact_names_the_module(peer, tmp_path):
    path = shutil.copytree(peer / "asym", tmp_path / "damaged")
    module = "model.layers.1.self_attn.o_proj"
    rewrite(path, lambda t: t.__setitem__(f"{module}.scales", t[f"{module}.scales"][:1].contiguous()))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "awq").get(f"{module}.weight")
    assert one_line(e) == f"{module}: scales [1, 64] and qzeros [2, 8] do not hold 2 groups of 64 inputs (group_size 32)"

"""GPTQ checkpoints from any tool (quantkit, GPTQModel, AutoGPTQ, optimum): qweight/qzeros/scales/g_idx per Linear,
dequantized exactly as write/gptq_format.py defines the format."""
from __future__ import annotations

from torch import Tensor

from quantkit.formats.view import PackedLinears, Shapes
from quantkit.write.gptq_format import QUANT_SUFFIXES, dequantize_module
from quantkit.write.packing import packed_length

FORMAT = "gptq"


def layout(settings: dict) -> PackedLinears:
    """The GPTQ layout for checked settings (verification/integrity.py checks bits and checkpoint_format)."""
    bits, fmt = int(settings["bits"]), settings.get("checkpoint_format", "gptq")

    def dequantize(t: dict[str, Tensor]) -> Tensor:
        return dequantize_module(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, fmt=fmt)

    def weight_shape(s: Shapes) -> tuple[int, int]:
        n_in, n_out = s["g_idx"][0], s["scales"][1]
        if s["qweight"] != (packed_length(n_in, bits), n_out):
            raise ValueError(f"qweight is {list(s['qweight'])}, scales and g_idx imply a [{n_out}, {n_in}] weight")
        return n_out, n_in

    return PackedLinears(FORMAT, "qweight", QUANT_SUFFIXES, dequantize, weight_shape,
                         settings={"bits": bits, "checkpoint_format": fmt})

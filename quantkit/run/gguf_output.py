"""A GGUF output's layer steps: which ggml type each Linear gets, its solve onto llama.cpp's blocks (GPTQ or
round-to-nearest), and the blocks as a finished step stores them for the assembly (run/assemble_gguf.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError, QuantkitError
from quantkit.solve.ggml_grids import GGML_TYPES, choose_grid, dequantize, nearest_codes
from quantkit.solve.gptq_grids import GridResult, gptq_on_grids
from quantkit.write.ggml_blocks import pack
from quantkit.write.gguf_file import gguf_tensor_name
from quantkit.write.gguf_mix import tensor_type
from quantkit.write.gguf_model import is_type_70b, model_shape

BLOCKS_SUFFIX = ".ggml"  # a step's tensor <linear>.ggml: the Linear's blocks, uint8 [out, row bytes]
TYPE_SUFFIX = ".ggml_type"  # and <linear>.ggml_type: int32 [1], its gguf GGMLQuantizationType


@dataclass(frozen=True)
class GGUFLayout:
    """What decides a GGUF output's types: llama.cpp's file type, the model's config, and whether the grids are
    weighted by importance (llama.cpp's mixes differ with an importance matrix)."""
    file_type: str
    config: dict
    n_layers: int
    tied: bool  # no output.weight: the embeddings are the head, and get the head's type
    type_70b: bool  # llama.cpp's LLM_TYPE_70B, whose attn_v gets more bits
    importance: bool

    @classmethod
    def of(cls, spec: QuantSpec, config: dict) -> GGUFLayout:
        """The layout of a run writing spec.gguf_type; a model llama.cpp files cannot hold is refused (one line)."""
        if spec.gguf_type is None:
            raise QuantkitError("internal error: a GGUF layout for a run that writes no GGUF")
        shape = model_shape(config)
        return cls(spec.gguf_type, config, shape.n_layers, shape.tied, is_type_70b(config),
                   spec.method == "gptq" and spec.gguf_importance)

    def type_of(self, tensor: str, shape: tuple[int, ...]) -> str:
        """The ggml type (or F16/F32) of checkpoint tensor `tensor` (e.g. model.layers.0.mlp.down_proj.weight)."""
        name = gguf_tensor_name(tensor, self.config)
        if name is None:
            raise QuantkitError(f"{tensor} has no tensor name in llama.cpp's layout of this model")
        return tensor_type(self.file_type, name, self.n_layers, shape[-1], tied_embeddings=self.tied,
                           n_dims=len(shape), imatrix=self.importance, type_70b=self.type_70b)

    def check_linears(self, where: str, shapes: dict[str, tuple[int, int]], spec: QuantSpec) -> None:
        """Every Linear of a decoder layer (name within the layer -> (out, in)) that is quantized gets a block type
        its rows hold; llama.cpp would keep one whose rows fit no block in float16, which quantkit refuses."""
        for name, (n_out, n_in) in shapes.items():
            if spec.skips(name):
                continue
            ggml = self.type_of(f"{where}.{name}.weight", (n_out, n_in))
            if ggml not in GGML_TYPES:
                raise QuantkitError(f"{where}.{name}: rows of {n_in} fit no llama.cpp block ({self.file_type} "
                                    f"gives it {ggml}); use --skip {name}")


def linear_types(layout: GGUFLayout, out_names: list[str], weights: list[Tensor]) -> list[str]:
    """The ggml type of each Linear, by its output name and weight shape."""
    return [layout.type_of(f"{out}.weight", tuple(w.shape)) for out, w in zip(out_names, weights)]


def solve_on_blocks(label: str, weights: list[Tensor], hessian: Tensor, types: list[str], spec: QuantSpec,
                    cross: Tensor | None) -> list[GridResult]:
    """GPTQ of Linears sharing `hessian` (consumed) onto their types' blocks; a failure is named after `label`."""
    try:
        return gptq_on_grids(weights, hessian, types, spec, consume_hessian=True, cross=cross,
                             weighted=spec.gguf_importance)
    except NumericalError as e:
        raise NumericalError(f"{label}: {e}") from None


def rounded_on_blocks(weight: Tensor, ggml: str) -> GridResult:
    """Round-to-nearest onto llama.cpp's own grid for `weight`: what llama-quantize writes without an imatrix."""
    grid = choose_grid(weight.float(), ggml)
    codes = nearest_codes(weight.float(), grid)
    return GridResult(codes=codes, grid=grid, weight=dequantize(codes, grid), loss=0.0, damp=0.0)


def step_tensors(out_name: str, result: GridResult) -> dict[str, Tensor]:
    """The tensors a finished step keeps for one Linear: its blocks and their type."""
    blocks = torch.from_numpy(pack(result.codes.cpu(), result.grid))
    return {f"{out_name}{BLOCKS_SUFFIX}": blocks,
            f"{out_name}{TYPE_SUFFIX}": torch.tensor([result.grid.type.type_id], dtype=torch.int32)}

"""GPTQ onto llama.cpp's fixed block grids: the values the solve reports are the file's, bit for bit, for every
type; the sweep beats round-to-nearest on the same grids; Linears of different types share one solve."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from quantkit.config import QuantSpec
from quantkit.solve.ggml_grids import GGML_TYPES, choose_grid, nearest_codes
from quantkit.solve.ggml_grids import dequantize as grid_values
from quantkit.solve.gptq_grids import gptq_on_grids
from quantkit.write.ggml_blocks import pack

TYPES = sorted(GGML_TYPES)


def _layer(n_out: int = 48, n_in: int = 256, tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few loud channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :4] *= 8
    return w, 2 * x.T @ x / tokens


def _file_values(codes: torch.Tensor, grid) -> np.ndarray:  # noqa: ANN001
    return gguf_dequantize(pack(codes, grid), GGMLQuantizationType(grid.type.type_id)).reshape(codes.shape)


@pytest.mark.parametrize("ggml", TYPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_the_solved_weight_is_what_gguf_reads_back(ggml: str, act_order: bool) -> None:
    w, H = _layer()
    (res,) = gptq_on_grids([w], H, [ggml], QuantSpec(act_order=act_order))
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= GGML_TYPES[ggml].maxq
    assert res.weight is not None
    np.testing.assert_array_equal(res.weight.numpy(), _file_values(res.codes, res.grid))
    np.testing.assert_array_equal(grid_values(res.codes, res.grid).numpy(), res.weight.numpy())


@pytest.mark.parametrize("ggml", TYPES)
def test_gptq_on_the_grid_has_less_output_error_than_rounding_to_nearest(ggml: str) -> None:
    w, H = _layer(seed=1)
    (res,) = gptq_on_grids([w], H, [ggml], QuantSpec(act_order=True), weighted=False)
    nearest = grid_values(nearest_codes(w, choose_grid(w, ggml)), choose_grid(w, ggml))

    def error(q: torch.Tensor) -> float:
        d = w - q
        return float(torch.einsum("ij,jk,ik->", d, H, d))

    assert res.weight is not None
    assert error(res.weight) < 0.8 * error(nearest)


def test_linears_of_different_types_share_one_solve() -> None:
    """q/k/v read one input: stacked with their own types (llama.cpp gives attn_v more bits), each Linear gets the
    codes it gets when solved alone."""
    w, H = _layer(n_out=64, seed=2)
    parts, types = [w[:32], w[32:48], w[48:]], ["Q4_K", "Q6_K", "Q8_0"]
    together = gptq_on_grids(parts, H, types, QuantSpec(act_order=False))
    for part, ggml, res in zip(parts, types, together):
        (alone,) = gptq_on_grids([part], H, [ggml], QuantSpec(act_order=False))
        assert res.grid.type.name == ggml
        agree = float((alone.codes == res.codes).float().mean())
        assert agree > 0.99, f"{ggml}: {agree:.4f} of the codes agree"


def test_importance_weights_the_grid_choice() -> None:
    """With importance, the loud inputs' columns decide the grid: the choice differs from llama.cpp's without."""
    w, H = _layer(seed=3)
    (weighted,) = gptq_on_grids([w], H, ["Q4_K"], QuantSpec(act_order=False), weighted=True)
    (plain,) = gptq_on_grids([w], H, ["Q4_K"], QuantSpec(act_order=False), weighted=False)
    scale_w, scale_p = weighted.grid.affine()[0], plain.grid.affine()[0]
    assert not torch.equal(scale_w, scale_p)


def test_a_type_per_weight_is_required() -> None:
    w, H = _layer()
    with pytest.raises(ValueError, match="2 weights but 1 ggml types"):
        gptq_on_grids([w, w], H, ["Q4_0"], QuantSpec())

"""quantkit's GPTQ runtime layer: a pure-torch Linear that dequantizes a checkpoint's packed tensors.

No CUDA kernel and no gptqmodel: `GPTQLinear` keeps the checkpoint's packed tensors as buffers and
dequantizes them with `gptq_format.dequantize_module`, so its outputs equal those of a plain Linear holding
the dequantized weight bit for bit (see tests/test_verify.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.write.gptq_format import dequantize_module, zero_offset
from quantkit.write.packing import packed_length


class GPTQLinear(nn.Module):
    """y = x @ W.T + b with W dequantized from GPTQ tensors (buffers, as stored on disk) in each forward.

    qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32], scales float16 [G, N], g_idx int32 [K],
    bias [N] or None. With cache_weight, the first forward keeps the dequantized weight for later calls.
    """

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, fmt: str = "gptq",
                 bias: bool = False, scales_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "meta", cache_weight: bool = False) -> None:
        super().__init__()
        zero_offset(fmt)  # validates the format name
        self.in_features, self.out_features, self.bits, self.fmt = in_features, out_features, bits, fmt
        self.cache_weight = cache_weight
        self._cached: Tensor | None = None
        self.register_buffer("qweight", torch.empty(packed_length(in_features, bits), out_features, dtype=torch.int32,
                                                     device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, packed_length(out_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_tensors(cls, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str,
                     bias: Tensor | None = None, cache_weight: bool = False) -> GPTQLinear:
        layer = cls(g_idx.shape[0], scales.shape[1], bits, scales.shape[0], fmt, bias is not None, scales.dtype,
                    bias.dtype if bias is not None else torch.float16, device="cpu", cache_weight=cache_weight)
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx), ("bias", bias)):
            if t is not None:
                layer._buffers[name] = t
        return layer

    def dequantized_weight(self) -> Tensor:
        """Float32 weight [N, K], exactly as the format defines it."""
        return dequantize_module(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.fmt)

    def forward(self, x: Tensor) -> Tensor:
        weight = self._cached
        if weight is None or weight.dtype != x.dtype or weight.device != x.device:
            weight = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
            self._cached = weight if self.cache_weight else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={self.scales.shape[0]}, format={self.fmt}, bias={self.bias is not None}")

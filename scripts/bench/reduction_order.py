#!/usr/bin/env python
"""How far GPTQ's output moves when only the order in which a Hessian is summed changes: one process's running
mean over every mini-batch against the token-weighted mean of two halves (what two torchrun processes sum).

    python scripts/bench/reduction_order.py demo/SmolLM2-135M-Instruct --layer 0

Runs the first --samples calibration windows through the model (float32, transformers), keeps the inputs of
o_proj and down_proj in decoder layer --layer, sums each Linear's Hessian both ways, solves GPTQ on each (4-bit,
group 128, with and without act-order), and prints the largest difference between the two Hessians, the share of
codes alike, and each solve's output error on the calibration inputs. Then the exact sums of quantize
--exact-sums (solve/hessian.py add_gram, mean_of_sum): each mini-batch's float32 product added in float64, split
into 1, 2 and 3 contiguous shares of mini-batches (what 1, 2, 3 processes would sum), the shares added, scaled by
2/tokens and rounded to float32: the entries that differ from one process's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # quantkit from this checkout

from quantkit.config import CalibSpec, QuantSpec  # noqa: E402
from quantkit.run.ranks import window_share  # noqa: E402
from quantkit.solve.gptq import gptq_quantize_shared  # noqa: E402
from quantkit.solve.hessian import SUM_DTYPE, accumulate_hessian, add_gram, mean_of_sum  # noqa: E402
from quantkit.source.calibration import calibration_batch  # noqa: E402

LINEARS = ("self_attn.o_proj", "mlp.down_proj")


def running_mean(batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    k = batches[0].shape[-1]
    hessian, tokens = torch.zeros(k, k), 0
    for x in batches:
        hessian, tokens = accumulate_hessian(hessian, tokens, x)
    return hessian, tokens


def shares(items: list, n: int) -> list[list]:
    """`items` cut into n contiguous shares as n processes get their windows (run.ranks.window_share)."""
    return [items[window_share(len(items), rank, n)] for rank in range(n)]


def exact_mean(products: list[torch.Tensor], tokens: int, n: int) -> torch.Tensor:
    """mean_of_sum of the mini-batches' exact sums (add_gram of each alone, computed once): added within each of n
    contiguous shares, then the shares' sums added (what n processes would reduce)."""
    total = torch.zeros_like(products[0])
    for share in shares(products, n):
        share_sum = torch.zeros_like(total)
        for product in share:
            share_sum += product
        total += share_sum
    return mean_of_sum(total, tokens)


def exact_product(x: torch.Tensor) -> torch.Tensor:
    """One mini-batch's XᵀX as add_gram adds it to an exact sum."""
    S = torch.zeros(x.shape[-1], x.shape[-1], dtype=SUM_DTYPE)
    add_gram(S, x)
    return S


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = calibration_batch(AutoTokenizer.from_pretrained(args.model), CalibSpec(samples=args.samples, seq_len=512))
    layer = model.model.layers[args.layer]
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in LINEARS}
    for name in LINEARS:
        layer.get_submodule(name).register_forward_pre_hook(lambda m, i, n=name: inputs[n].append(i[0].detach()))
    with torch.no_grad():
        for start in range(0, args.samples, 2):  # the CPU pipeline's mini-batches: two 512-token windows
            model(ids[start:start + 2])
    for name in LINEARS:
        batches = inputs[name]
        one, _ = running_mean(batches)
        (a, ta), (b, tb) = (running_mean(share) for share in shares(batches, 2))
        two = a * (ta / (ta + tb)) + b * (tb / (ta + tb))
        weight = layer.get_submodule(name).weight.detach().float()
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in batches])
        print(f"layer {args.layer} {name}: largest |difference| of the Hessians / their largest entry "
              f"{((one - two).abs().max() / one.abs().max()).item():.2e}")
        for act_order in (True, False):
            spec = QuantSpec(bits=4, group_size=128, act_order=act_order)
            r1 = gptq_quantize_shared([weight.clone()], one.clone(), spec)[0]
            r2 = gptq_quantize_shared([weight.clone()], two.clone(), spec)[0]
            error = [((x @ (r.weight - weight).T) ** 2).mean().item() for r in (r1, r2)]
            print(f"  act-order {act_order}: codes alike {(r1.codes == r2.codes).float().mean().item():.4f}, "
                  f"g_idx alike {torch.equal(r1.g_idx, r2.g_idx)}, output error {error[0]:.5g} against {error[1]:.5g}")
        products = [exact_product(t) for t in batches]
        one64 = exact_mean(products, ta + tb, 1)
        for n in (2, 3):
            differing = int((exact_mean(products, ta + tb, n) != one64).sum())
            print(f"  float64 sums in {n} shares: {differing} of {one64.numel()} entries differ from 1 share's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

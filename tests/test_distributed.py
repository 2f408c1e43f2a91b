"""Several processes under torchrun (gloo on the CPU): the calibration windows split, the Hessians summed, the solves
spread; the reduction bit for bit, the output against one process's, a killed process, resume, and the pure
scheduling helpers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from test_moe import MOE_ARCHITECTURES

from quantkit.calibrate.statistics import HessianSum, Statistics
from quantkit.config import CalibSpec, QuantSpec
from quantkit.run.ranks import Ranks, solve_cost, spread_by_cost, window_share
from quantkit.run.solves import solve_stage
from quantkit.source.calibration import calibration_batch
from quantkit.verification.dequantized import load_dequantized
from quantkit.verification.metrics import perplexity
from quantkit.write.gptq_format import checkpoint_format
from quantkit.write.packing import unpack_qweight

ARGS = ["--samples", "8", "--seq-len", "64", "--group-size", "32"]
# 64-token windows go through a layer 16 at a time on a CPU: mini-batches of 16, 16 and 8 windows, shared 16 and 24
EXACT = ("--exact-sums", "--samples", "40")


def quantize(model: Path, out: Path, *extra: str, processes: int = 2, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """`quantkit quantize MODEL --out OUT` in `processes` processes under torchrun (one: a plain process)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "quantkit", "quantize", str(model), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    found: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        found.update(load_file(str(out / shard)))
    return found


def assert_same_files(one: Path, two: Path) -> None:
    """Two output directories hold the same files, byte for byte."""
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def codes_equal(a: Path, b: Path, bits: int = 4) -> float:
    """The share of the quantized weights' codes (qweight, unpacked) two outputs hold alike; their tensors' names
    and shapes must be the same."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    same = total = 0
    for name, t in ta.items():
        assert t.shape == tb[name].shape, name
        if name.endswith(".qweight"):
            in_features = t.shape[0] * 32 // bits
            same += int((unpack_qweight(t, bits, in_features) == unpack_qweight(tb[name], bits, in_features)).sum())
            total += t.numel() * 32 // bits
    return same / total


@pytest.fixture(scope="module")
def evaluation(tiny_tokenizer) -> torch.Tensor:
    return calibration_batch(tiny_tokenizer, CalibSpec(samples=8, seq_len=64, seed=1))


def test_spread_by_cost_gives_the_costliest_first_to_the_least_loaded():
    load = [0.0, 0.0]
    assert spread_by_cost([1.0, 5.0, 3.0, 3.0], load) == [0, 0, 1, 1]  # 5 -> 0; 3, 3 -> 1; then 1 -> 0
    assert load == [6.0, 6.0]
    assert spread_by_cost([2.0], load) == [0]  # ties to the lowest rank; the load carries over
    assert spread_by_cost([2.0], load) == [1]
    assert solve_cost(4096, 12288) > solve_cost(4096, 4096) > solve_cost(1024, 4096)


@pytest.mark.parametrize("samples,world", [(8, 2), (7, 2), (5, 4), (3, 3)])
def test_window_shares_cover_every_window_once(samples, world):
    shares = [window_share(samples, r, world) for r in range(world)]
    covered = [i for s in shares for i in range(samples)[s]]
    assert covered == list(range(samples))
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1


SHAPES = {"a": (64, 96), "b": (64, 32), "c": (128, 64), "d": (32, 64)}  # name: (in, out)
GROUPS = [["a", "b"], ["c"], ["d"]]  # a and b share an input, so a Hessian
SPEC = QuantSpec(bits=4, group_size=32)


def linears() -> dict[str, torch.nn.Linear]:
    torch.manual_seed(0)
    return {name: torch.nn.Linear(k, n, bias=False) for name, (k, n) in SHAPES.items()}


def own_statistics(rank: int) -> list[Statistics]:
    """Each process's Hessians, from its own inputs (a different number of tokens on each)."""
    torch.manual_seed(1 + rank)
    found = []
    for group in GROUPS:
        k = SHAPES[group[0]][0]
        sums = HessianSum(torch.zeros(k, k))
        for _ in range(2 + rank):
            sums.add(torch.randn(16, k) * torch.linspace(0.5, 2.0, k))
        found.append(Statistics(sums.hessian, None, sums.tokens))
    return found


def solve_stage_in_process(rank: int, world: int, port: int, out: Path) -> None:
    """One process of a gloo group: its own Hessians through solve_stage; what it ends with saved for the test."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ranks = Ranks.from_environment(torch.device("cpu"))
    modules = linears()
    results = solve_stage(ranks, "layer", GROUPS, own_statistics(rank), modules, SPEC, checkpoint_format(SPEC),
                          lambda name: name)
    torch.save({"tensors": {n: r.tensors for n, r in results.items()}, "losses": {n: r.loss for n, r in
                                                                                   results.items()},
                "weights": {n: m.weight.detach() for n, m in modules.items()}, "load": ranks.load},
               out / f"{rank}.pt")
    ranks.close()
    os._exit(0)  # as quantkit's command does under torchrun: a gloo process's C++ static destructors can abort it


def test_the_reduced_hessians_are_solved_once_and_every_process_ends_with_the_same_layer(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(solve_stage_in_process, args=(2, port, tmp_path), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # the solves went to both processes, by cost
    assert got[0]["load"] == got[1]["load"] and all(load > 0 for load in got[0]["load"])
    # one process's solve of the token-weighted mean of both processes' Hessians, bit for bit
    parts = [own_statistics(r) for r in range(2)]
    reference = linears()
    for k, group in enumerate(GROUPS):
        total = sum(p[k].tokens for p in parts)
        hessian = parts[0][k].hessian.mul_(parts[0][k].tokens / total) + \
            parts[1][k].hessian.mul_(parts[1][k].tokens / total)
        expected = solve_stage(Ranks.single(), "layer", [group], [Statistics(hessian, None, total)], reference, SPEC,
                               checkpoint_format(SPEC), lambda name: name)
        for name in group:  # process 0, which writes them, gets the packed tensors; both the losses
            assert got[0]["tensors"][name].keys() == expected[name].tensors.keys() and not got[1]["tensors"][name]
            assert all(torch.equal(t, expected[name].tensors[key]) for key, t in got[0]["tensors"][name].items())
            assert got[0]["losses"][name] == got[1]["losses"][name] == expected[name].loss
    for name, module in reference.items():  # the quantized weights written back, in both processes
        assert torch.equal(got[0]["weights"][name], module.weight) and torch.equal(got[1]["weights"][name],
                                                                                   module.weight)


@pytest.fixture(scope="module")
def single_and_two(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    one, two = root / "one", root / "two"
    r1 = quantize(tiny_llama_dir, one, "--json", processes=1)
    r2 = quantize(tiny_llama_dir, two, "--json")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr
    return one, two, json.loads(r1.stdout), json.loads(r2.stdout.strip().splitlines()[-1])


def assert_as_good(one: Path, two: Path, evaluation: torch.Tensor) -> None:
    """Two processes sum each Hessian in another order than one does: float noise (about 1e-7 of its scale) that
    flips a few GPTQ codes, and through the later Linears' inputs more (docs/BENCHMARKS.md, several processes).
    The codes stay mostly the same and the model as good; exactness is tested on the reduction itself."""
    assert codes_equal(one, two) >= 0.9
    base = perplexity(load_dequantized(str(one)).eval(), evaluation)
    other = perplexity(load_dequantized(str(two)).eval(), evaluation)
    assert abs(other - base) / base < 0.01


def test_two_processes_give_the_one_process_output_within_reduction_noise(single_and_two, evaluation):
    assert_as_good(*single_and_two[:2], evaluation)


def test_process_zero_alone_reports_the_run(single_and_two):
    _, two, single, report = single_and_two
    assert report["processes"] == 2 and report["rank"] == 0 and single["processes"] == 1
    assert report["path"] == str(two) and len(report["layers"]) == len(single["layers"])
    config = json.loads((two / "config.json").read_text())
    assert config["quantization_config"] == json.loads((single_and_two[0] / "config.json").read_text())[
        "quantization_config"]


def test_a_killed_process_publishes_nothing_and_the_run_resumes(tiny_llama_dir, single_and_two, tmp_path):
    _, two, _, _ = single_and_two
    out = tmp_path / "out"
    r = quantize(tiny_llama_dir, out, env={"QUANTKIT_KILL_AT": "layer:1:start", "QUANTKIT_KILL_RANK": "1"})
    assert r.returncode != 0 and not out.exists()
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: process 0 of 2")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "rerun the same command to resume" in errors[0]
    work = tmp_path / ".out.quantkit-work" / "state"
    assert (work / "activations-00001.0-of-2.safetensors").is_file()
    assert (work / "activations-00001.1-of-2.safetensors").is_file()
    r = quantize(tiny_llama_dir, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after layer 1/2" in r.stderr
    assert tensors(out).keys() == tensors(two).keys()
    assert all(torch.equal(t, tensors(two)[k]) for k, t in tensors(out).items())  # the same bytes as unbroken
    assert not (tmp_path / ".out.quantkit-work").exists()


def test_a_state_of_another_process_count_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    r = quantize(tiny_llama_dir, out, env={"QUANTKIT_KILL_AT": "layer:1:start"})
    assert r.returncode != 0
    r = quantize(tiny_llama_dir, out, processes=1)
    assert r.returncode == 1 and "holds an unfinished run of a different model, settings or calibration" in r.stderr


def test_gptaq_and_the_head_across_processes(tiny_llama_dir, tmp_path, evaluation):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--gptaq", "--lm-head", "--static-groups")
    r1, r2 = quantize(tiny_llama_dir, one, *extra, processes=1), quantize(tiny_llama_dir, two, *extra)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    assert "lm_head.qweight" in tensors(two)
    assert_as_good(one, two, evaluation)


def test_experts_solved_across_processes(tiny_tokenizer, tmp_path):
    config = MOE_ARCHITECTURES["qwen3_moe"]
    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type="qwen3_moe", **config)
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--expert-min-tokens", "4")
    r1, r2 = quantize(base, one, *extra, processes=1), quantize(base, two, *extra, "--json")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    assert codes_equal(one, two) >= 0.9
    # each block's token counts are summed over both processes' windows: every calibration token reached top-k
    report = json.loads(r2.stdout.strip().splitlines()[-1])
    blocks = [block for layer in report["layers"] for block in layer["experts"].values()]
    assert blocks and all(sum(b["tokens"]) == 8 * 64 * config["num_experts_per_tok"] for b in blocks)


def test_fewer_windows_than_processes_is_one_line(tiny_llama_dir, tmp_path):
    r = quantize(tiny_llama_dir, tmp_path / "out", "--samples", "1", processes=2)
    assert r.returncode != 0
    assert "Error: --samples 1 gives fewer calibration windows than the run's 2 processes" in r.stderr


def test_a_damaged_inputs_file_of_one_process_is_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    r = quantize(tiny_llama_dir, out, env={"QUANTKIT_KILL_AT": "layer:1:start"})
    assert r.returncode != 0
    saved = tmp_path / ".out.quantkit-work" / "state" / "activations-00001.1-of-2.safetensors"
    saved.write_bytes(saved.read_bytes()[:-8])
    r = quantize(tiny_llama_dir, out)
    assert r.returncode != 0 and not out.exists()
    assert f"Error: {saved} is " in r.stderr and "remove that directory to start over" in r.stderr
    assert saved.is_file()  # the state is left as it is, for the user to remove


@pytest.mark.parametrize("kill_at,extra", [("assembled", ()), ("layer:1:start", ("--method", "rtn"))])
def test_a_run_killed_after_its_last_step_or_without_inputs_resumes(tiny_llama_dir, tmp_path, kill_at, extra):
    """The last step saves no next inputs, and RTN none at all: their state records none, for any process count."""
    unbroken, out = tmp_path / "unbroken", tmp_path / "out"
    assert quantize(tiny_llama_dir, unbroken, *extra).returncode == 0
    r = quantize(tiny_llama_dir, out, *extra, env={"QUANTKIT_KILL_AT": kill_at, "QUANTKIT_KILL_RANK": "0"})
    assert r.returncode != 0 and not out.exists()
    r = quantize(tiny_llama_dir, out, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after layer" in r.stderr
    expected = tensors(unbroken)
    assert all(torch.equal(t, expected[k]) for k, t in tensors(out).items()) and tensors(out).keys() == expected.keys()


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_exact_sums_make_two_processes_write_the_one_process_bytes(tiny_tokenizer, tmp_path, model_type):
    """--exact-sums: the Hessians (GPTAQ's cross terms, the head's, each expert's) summed exactly from whole
    mini-batches, so the processes' shares add up to one process's sums bit for bit, and so does everything after."""
    config = MOE_ARCHITECTURES[model_type] if model_type != "llama" else {}
    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type=model_type, **config)
    extra = (*EXACT, "--gptaq", "--lm-head") if model_type == "llama" else (*EXACT, "--expert-min-tokens", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = quantize(base, one, *extra, processes=1), quantize(base, two, *extra)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-3000:]
    assert "(16 of them in this process of 2)" in r2.stderr or "(24 of them in this process of 2)" in r2.stderr
    assert_same_files(one, two)
    assert json.loads((two / "quantkit.json").read_text())["quantization"]["exact_sums"] is True


def test_exact_sums_with_fewer_mini_batches_than_processes_is_one_line(tiny_llama_dir, tmp_path):
    r = quantize(tiny_llama_dir, tmp_path / "out", "--exact-sums", "--samples", "16")
    assert r.returncode != 0 and not (tmp_path / "out").exists()
    assert "Error: --exact-sums shares the calibration among processes in whole mini-batches of 16 windows: " \
           "--samples 16 makes 1, fewer than the run's 2 processes; use --samples 17 or more" in r.stderr

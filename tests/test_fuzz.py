"""A fixed corpus of damaged inputs fed to every command: configs, indexes, safetensors headers, manifests, hub-cache
refs and folders, resume states and GGUF files. Every case must exit 1 or 2 with one `Error:` line on stderr and no
traceback, and leave a decoy tree (which some damages point at) exactly as it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.app import cli

REPO_ID = "fuzz/tiny"
CACHE_FOLDER = "models--fuzz--tiny"
FAST = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]


@dataclass(frozen=True)
class Case:
    name: str
    fixture: str  # which pristine tree the case starts from: base, quantized, thebloke, cache, resume, gguf
    damage: Callable[[Path, Path], None]  # (case directory, decoy directory)
    command: Callable[[Path], list[str]]  # case directory -> arguments
    repairs: bool = False  # the command is the repair of this damage (cache rm): exit 0, still touching nothing else


# ---------------------------------------------------------------- damages of one JSON file

def _json_variants(original: dict | None = None) -> dict[str, bytes]:
    return {"empty": b"", "not-utf8": b"\xff\xfe{\x00\x01", "truncated": b'{"a": [1, 2', "list": b"[1]",
            "string": b'"x"', "number": b"5", "null": b"null", "deep": b"[" * 50000 + b"]" * 50000,
            "huge-int": b'{"a": 1' + b"0" * 5000 + b"}", "empty-object": b"{}"}


def write_bytes(rel: str, data: bytes) -> Callable[[Path, Path], None]:
    def damage(case: Path, decoy: Path) -> None:
        (case / rel).write_bytes(data)
    return damage


def edit_json(rel: str, edit: Callable[[dict, Path], None]) -> Callable[[Path, Path], None]:
    def damage(case: Path, decoy: Path) -> None:
        obj = json.loads((case / rel).read_text())
        edit(obj, decoy)
        (case / rel).write_text(json.dumps(obj))
    return damage


def set_key(key: str, value) -> Callable[[dict, Path], None]:
    def edit(obj: dict, decoy: Path) -> None:
        obj[key] = value
    return edit


# ---------------------------------------------------------------- damages of one safetensors file

def _header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_damage(rel: str, kind: str) -> Callable[[Path, Path], None]:
    def damage(case: Path, decoy: Path) -> None:
        path = case / rel
        raw = path.read_bytes()
        header, data = _header_of(path)
        names = sorted(k for k in header if k != "__metadata__")
        first, second = names[0], names[1]
        if kind == "zero-bytes":
            out = b""
        elif kind == "short":
            out = raw[:5]
        elif kind == "huge-length":
            out = struct.pack("<Q", 2**63) + raw[8:]
        elif kind == "length-past-end":
            out = struct.pack("<Q", len(raw)) + raw[8:]
        elif kind == "header-not-json":
            out = struct.pack("<Q", 8) + b"{garbage" + data
        elif kind == "header-not-utf8":
            out = struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8" + data
        elif kind == "header-list":
            out = _with_header([1], data)
        elif kind == "truncated-data":
            out = raw[: len(raw) - 64]
        else:
            entry = header[first]
            if kind == "entry-number":
                header[first] = 5
            elif kind == "entry-no-dtype":
                del entry["dtype"]
            elif kind == "entry-unknown-dtype":
                entry["dtype"] = "Q9"
            elif kind == "entry-negative-shape":
                entry["shape"] = [-1] + entry["shape"][1:]
            elif kind == "entry-string-shape":
                entry["shape"] = ["a"]
            elif kind == "entry-offsets-past-end":
                size = entry["data_offsets"][1] - entry["data_offsets"][0]
                entry["data_offsets"] = [len(data) + 64, len(data) + 64 + size]
            elif kind == "entry-offsets-reversed":
                entry["data_offsets"] = entry["data_offsets"][::-1]
            elif kind == "entry-offsets-overlap":
                header[second]["data_offsets"] = list(entry["data_offsets"])
                header[second]["shape"], header[second]["dtype"] = entry["shape"], entry["dtype"]
            elif kind == "entry-size-disagrees":
                entry["shape"] = [entry["shape"][0] * 2] + entry["shape"][1:]
            elif kind == "metadata-list":
                header["__metadata__"] = [1]
            out = _with_header(header, data)
        path.write_bytes(out)
    return damage


SAFETENSORS_KINDS = ["zero-bytes", "short", "huge-length", "length-past-end", "header-not-json", "header-not-utf8",
                     "header-list", "truncated-data", "entry-number", "entry-no-dtype", "entry-unknown-dtype",
                     "entry-negative-shape", "entry-string-shape", "entry-offsets-past-end", "entry-offsets-reversed",
                     "entry-offsets-overlap", "entry-size-disagrees", "metadata-list"]


def vouched(damage: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """The damage of a quantized checkpoint's file with its manifest rewritten to vouch for it, as a hostile or
    buggy tool would: the checks behind the manifest's hashes must catch it."""
    def both(case: Path, decoy: Path) -> None:
        damage(case, decoy)
        q = case / "q"
        manifest = json.loads((q / "quantkit.json").read_text())
        for name in list(manifest["files"]):
            if (q / name).is_file():
                manifest["files"][name] = {"sha256": hashlib.sha256((q / name).read_bytes()).hexdigest(),
                                           "size": (q / name).stat().st_size}
        for path in q.iterdir():
            if path.is_file() and path.name != "quantkit.json":
                manifest["files"].setdefault(path.name, {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                                         "size": path.stat().st_size})
        (q / "quantkit.json").write_text(json.dumps(manifest))
    return both


Q_SHARD = "q/model-00001-of-00001.safetensors"
TB_SHARD = "q/gptq_model-4bit-32g.safetensors"  # AutoGPTQ's layout: one file by that name, no index, no manifest


# ---------------------------------------------------------------- the corpus

def quantize_out(case: Path) -> list[str]:
    return ["quantize", str(case / "base"), "--out", str(case / "q"), "--json", *FAST]


def quantize_rtn(case: Path) -> list[str]:
    return ["quantize", str(case / "base"), "--out", str(case / "q"), "--json", "--method", "rtn"]


def verify_q(case: Path) -> list[str]:
    return ["verify", str(case / "q"), "--json", "--no-generate", "--seq-len", "32", "--max-tokens", "64"]


def inspect_q(case: Path) -> list[str]:
    return ["inspect", str(case / "q")]


def estimate_base(case: Path) -> list[str]:
    return ["estimate", str(case / "base"), "--json"]


def corpus() -> list[Case]:
    cases: list[Case] = []
    base_readers = {"quantize": quantize_rtn, "estimate": estimate_base}
    # config.json of a base: bytes, then fields of the wrong type or size
    for label, data in _json_variants().items():
        for cmd, command in base_readers.items():
            cases.append(Case(f"config-{label}-{cmd}", "base", write_bytes("base/config.json", data), command))
        cases.append(Case(f"qconfig-{label}-verify", "quantized", vouched(write_bytes("q/config.json", data)),
                          verify_q))
        cases.append(Case(f"qconfig-{label}-inspect", "quantized", vouched(write_bytes("q/config.json", data)),
                          inspect_q))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "num_key_value_heads"):
        for value in (-1, 0, "x", [1], {"a": 1}, 10**12, 1.5):
            for cmd, command in base_readers.items():
                if value == 10**12 and cmd == "estimate":
                    continue  # estimate sizes hypothetical configs too: only a checkpoint's weights contradict it
                cases.append(Case(f"config-{key}={json.dumps(value)}-{cmd}", "base",
                                  edit_json("base/config.json", set_key(key, value)), command))
    for value in (5, None, ["llama"], "not-a-model"):
        cases.append(Case(f"config-model_type={json.dumps(value)}", "base",
                          edit_json("base/config.json", set_key("model_type", value)), quantize_rtn))
    for value in ([1], "gptq", {"quant_method": "gptq", "bits": "x"}, {"quant_method": "gptq", "bits": 4,
                                                                       "group_size": [1]}):
        damage = vouched(edit_json("q/config.json", set_key("quantization_config", value)))
        cases.append(Case(f"qconfig-quantization_config={json.dumps(value)}", "quantized", damage, verify_q))
        cases.append(Case(f"qconfig-quantization_config={json.dumps(value)}-inspect", "quantized", damage, inspect_q))
    # safetensors headers and data
    for kind in SAFETENSORS_KINDS:
        cases.append(Case(f"base-shard-{kind}-quantize", "base",
                          safetensors_damage("base/model.safetensors", kind), quantize_out))
        cases.append(Case(f"q-shard-{kind}-verify", "quantized", vouched(safetensors_damage(Q_SHARD, kind)), verify_q))
        cases.append(Case(f"q-shard-{kind}-inspect", "quantized", vouched(safetensors_damage(Q_SHARD, kind)),
                          inspect_q))
    # an index beside the single shard
    index_values = {"list": [1], "weight_map-list": {"weight_map": [1]}, "weight_map-number":
                    {"weight_map": {"model.embed_tokens.weight": 5}}, "weight_map-escape":
                    {"weight_map": {"model.embed_tokens.weight": "../../decoy/secret.safetensors"}},
                    "weight_map-absolute": {"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}},
                    "weight_map-missing-shard": {"weight_map": {"model.embed_tokens.weight": "nope.safetensors"}},
                    "weight_map-string": {"weight_map": "model.safetensors"}}
    for label, value in index_values.items():
        data = json.dumps(value).encode()
        cases.append(Case(f"index-{label}-quantize", "base",
                          write_bytes("base/model.safetensors.index.json", data), quantize_rtn))
        cases.append(Case(f"index-{label}-verify", "quantized",
                          vouched(write_bytes("q/model.safetensors.index.json", data)), verify_q))
        cases.append(Case(f"index-{label}-inspect", "quantized",
                          vouched(write_bytes("q/model.safetensors.index.json", data)), inspect_q))
    for label, data in _json_variants().items():
        cases.append(Case(f"index-bytes-{label}", "base", write_bytes("base/model.safetensors.index.json", data),
                          quantize_rtn))
    # the manifest of a quantized checkpoint
    for label, data in _json_variants().items():
        if label != "empty-object":
            cases.append(Case(f"manifest-{label}-verify", "quantized", write_bytes("q/quantkit.json", data), verify_q))
            cases.append(Case(f"manifest-{label}-inspect", "quantized", write_bytes("q/quantkit.json", data), inspect_q))

    def manifest_files(value) -> Callable[[dict, Path], None]:
        def edit(obj: dict, decoy: Path) -> None:
            obj["files"] = value(obj["files"]) if callable(value) else value
        return edit
    sha = "0" * 64
    manifest_edits = {
        "files-list": [1], "files-number": 5, "entry-number": lambda f: {**f, "config.json": 5},
        "entry-no-sha": lambda f: {**f, "config.json": {"size": 1}},
        "entry-bad-size": lambda f: {**f, "config.json": {**f["config.json"], "size": "big"}},
        "escape": lambda f: {**f, "../../decoy/secret.txt": {"sha256": sha, "size": 1}},
        "absolute": lambda f: {**f, "/etc/hostname": {"sha256": sha, "size": 1}},
        "nested": lambda f: {**f, "a/b": {"sha256": sha, "size": 1}},
        "missing-file": lambda f: {**f, "gone.bin": {"sha256": sha, "size": 1}},
        "wrong-hash": lambda f: {**f, "config.json": {**f["config.json"], "sha256": sha}},
    }
    for label, value in manifest_edits.items():
        cases.append(Case(f"manifest-{label}-verify", "quantized", edit_json("q/quantkit.json", manifest_files(value)),
                          verify_q))
        cases.append(Case(f"manifest-{label}-inspect", "quantized", edit_json("q/quantkit.json", manifest_files(value)),
                          inspect_q))
    cases += thebloke_cases() + cache_cases() + resume_cases() + gguf_cases()
    return cases


def thebloke_cases() -> list[Case]:
    """Another tool's GPTQ checkpoint (AutoGPTQ's layout): nothing vouches for its files, so every check behind
    the manifest must catch a damage on its own; the settings are read from quantize_config.json."""
    cases = []
    for label, data in _json_variants().items():
        for cmd, command in (("verify", verify_q), ("inspect", inspect_q)):
            cases.append(Case(f"tb-qc-{label}-{cmd}", "thebloke", write_bytes("q/quantize_config.json", data), command))
    edits = {"bits": "x", "group_size": [1], "format": "gptq_v9", "pack_dtype": "int8", "dynamic": [1],
             "is_marlin_format": True, "sym": "yes"}
    for key, value in edits.items():
        cases.append(Case(f"tb-qc-{key}={json.dumps(value)}-verify", "thebloke",
                          edit_json("q/quantize_config.json", set_key(key, value)), verify_q))
    for kind in SAFETENSORS_KINDS:
        for cmd, command in (("verify", verify_q), ("inspect", inspect_q)):
            cases.append(Case(f"tb-shard-{kind}-{cmd}", "thebloke", safetensors_damage(TB_SHARD, kind), command))
    return cases


def _repo(case: Path) -> Path:
    return case / "hub" / CACHE_FOLDER


def _rev(case: Path) -> str:
    return (_repo(case) / "refs" / "main").read_text()


def cache_cases() -> list[Case]:
    def ref(value: bytes | Callable[[Path, Path], bytes]):
        def damage(case: Path, decoy: Path) -> None:
            data = value(case, decoy) if callable(value) else value
            (_repo(case) / "refs" / "main").write_bytes(data)
        return damage

    def link_ref(case: Path, decoy: Path) -> None:
        r = _repo(case) / "refs" / "main"
        r.unlink()
        r.symlink_to(decoy / "secret.txt")

    def link_dir(sub: str):
        def damage(case: Path, decoy: Path) -> None:
            target = _repo(case) / sub
            for item in target.iterdir():
                (decoy / "victim" / item.name).mkdir(parents=True, exist_ok=True) if item.is_dir() else None
            shutil.rmtree(target)
            target.symlink_to(decoy / "victim")
        return damage

    def link_repo(case: Path, decoy: Path) -> None:
        repo = _repo(case)
        shutil.copytree(repo, decoy / "victim-repo", symlinks=True)
        shutil.rmtree(repo)
        repo.symlink_to(decoy / "victim-repo")

    def snapshot_file_to_decoy(case: Path, decoy: Path) -> None:
        link = _repo(case) / "snapshots" / _rev(case) / "config.json"
        link.unlink()
        link.symlink_to(decoy / "secret.txt")

    damages = {
        "ref-parent": lambda case, decoy: os.path.relpath(decoy, _repo(case) / "snapshots").encode(),
        "ref-absolute": lambda case, decoy: str(decoy).encode(),
        "ref-not-utf8": b"\xff\xfe\xfd", "ref-empty": b"", "ref-short": b"abc", "ref-41": b"a" * 41,
        "ref-newlines": b"\n\n", "ref-main": b"main", "ref-missing-snapshot": b"0" * 40,
    }
    cases = []
    commands = {
        "list": lambda case: ["cache", "list"],
        "rm": lambda case: ["cache", "rm", REPO_ID, "-y"],
        "inspect": lambda case: ["inspect", REPO_ID],
        "verify": lambda case: ["verify", REPO_ID, "--json", "--no-generate", "--seq-len", "32", "--max-tokens", "64"],
        "publish": lambda case: ["quantize", str(case / "base"), "--repo-id", REPO_ID, "--overwrite", "--json",
                                 "--method", "rtn"],
    }
    # a ref naming no snapshot is an entry without a model (an interrupted download looks the same): `list` leaves
    # it out, `publish` replaces it; a repo folder linked elsewhere is read through the link (big caches live on
    # other disks), and only writing or deleting through it is refused
    fine = {("ref-missing-snapshot", "list"), ("ref-missing-snapshot", "publish"), ("repo-link", "inspect"),
            ("repo-link", "verify"), ("snapshot-file-link", "list"), ("snapshot-file-link", "publish")}
    for label, value in damages.items():
        for cmd, command in commands.items():
            if (label, cmd) not in fine:
                cases.append(Case(f"cache-{label}-{cmd}", "cache", ref(value), command, repairs=cmd == "rm"))
    structural = {"ref-link": link_ref, "blobs-link": link_dir("blobs"), "snapshots-link": link_dir("snapshots"),
                  "repo-link": link_repo, "snapshot-file-link": snapshot_file_to_decoy}
    for label, damage in structural.items():
        for cmd, command in commands.items():
            if (label, cmd) not in fine:
                cases.append(Case(f"cache-{label}-{cmd}", "cache", damage, command,
                                  repairs=cmd == "rm" and label != "repo-link"))
    return cases


def _work(case: Path) -> Path:
    found = [p for p in case.iterdir() if p.name.endswith(".quantkit-work")]
    assert len(found) == 1, list(case.iterdir())
    return found[0]


def resume_cases() -> list[Case]:
    def state(data: bytes | Callable[[dict], object]):
        def damage(case: Path, decoy: Path) -> None:
            path = _work(case) / "state" / "state.json"
            if callable(data):
                path.write_text(json.dumps(data(json.loads(path.read_text()))))
            else:
                path.write_bytes(data)
        return damage

    def file_damage(pattern: str, how: str):
        def damage(case: Path, decoy: Path) -> None:
            files = sorted((_work(case) / "state").rglob(pattern))
            assert files, pattern
            path = files[0]
            raw = bytearray(path.read_bytes())
            if how == "missing":
                path.unlink()
            elif how == "truncated":
                path.write_bytes(bytes(raw[: len(raw) // 2]))
            elif how == "bitflip":
                raw[-3] ^= 0x10
                path.write_bytes(bytes(raw))
            elif how == "empty":
                path.write_bytes(b"")
        return damage

    shapes = {"layers-string": lambda s: {**s, "layers": "x"}, "layers-numbers": lambda s: {**s, "layers": [1, 2]},
              "no-fingerprint": lambda s: {k: v for k, v in s.items() if k != "fingerprint"},
              "fingerprint-number": lambda s: {**s, "fingerprint": 5}, "state-in-a-list": lambda s: [s],
              "too-many-layers": lambda s: {**s, "layers": s["layers"] * 5}}
    cases = [Case(f"resume-state-{label}", "resume", state(data), quantize_out)
             for label, data in _json_variants().items()]
    cases += [Case(f"resume-state-{label}", "resume", state(edit), quantize_out) for label, edit in shapes.items()]
    for pattern in ("layer-*.safetensors", "activations-*.safetensors"):
        for how in ("missing", "truncated", "bitflip", "empty"):
            cases.append(Case(f"resume-{pattern.split('-')[0]}-{how}", "resume", file_damage(pattern, how),
                              quantize_out))
    return cases


def gguf_cases() -> list[Case]:
    def gguf_bytes(edit: Callable[[bytes], bytes]):
        def damage(case: Path, decoy: Path) -> None:
            path = case / "model.gguf"
            path.write_bytes(edit(path.read_bytes()))
        return damage

    edits = {
        "magic-only": lambda b: b"GGUF",
        "bad-version": lambda b: b[:4] + struct.pack("<I", 99) + b[8:],
        "huge-tensor-count": lambda b: b[:8] + struct.pack("<Q", 2**62) + b[16:],
        "huge-kv-count": lambda b: b[:16] + struct.pack("<Q", 2**62) + b[24:],
        "truncated-header": lambda b: b[:40],
        "truncated-data": lambda b: b[: len(b) - 100],
        "zeros": lambda b: b[:4] + b"\x00" * (len(b) - 4),
        "html": lambda b: b"<html>not found</html>",
    }
    return [Case(f"gguf-{label}", "gguf", gguf_bytes(edit),
                 lambda case: ["import-gguf", str(case / "model.gguf"), str(case / "out")]) for label, edit in edits.items()]


CORPUS = corpus()


# ---------------------------------------------------------------- pristine trees, made once

@pytest.fixture(scope="module")
def pristine(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-pristine")
    trees: dict[str, Path] = {}

    base = root / "base"
    base.mkdir()
    shutil.copytree(tiny_llama_dir, base / "base")
    trees["base"] = base

    quantized = root / "quantized"
    shutil.copytree(base, quantized)
    r = CliRunner().invoke(cli, ["quantize", str(quantized / "base"), "--out", str(quantized / "q"), *FAST])
    assert r.exit_code == 0, r.output
    trees["quantized"] = quantized

    thebloke = root / "thebloke"
    shutil.copytree(quantized, thebloke)
    _as_thebloke(thebloke / "q")
    trees["thebloke"] = thebloke

    cache = root / "cache"
    shutil.copytree(base, cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(cache / "base"), "--repo-id", REPO_ID,
                        "--method", "rtn"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    trees["cache"] = cache

    resume = root / "resume"
    shutil.copytree(base, resume)
    r = subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(resume / "base"), "--out",
                        str(resume / "q"), "--json", *FAST], capture_output=True, text=True,
                       env={**os.environ, "QUANTKIT_KILL_AT": "layer:0:saved"}, timeout=600)
    assert r.returncode != 0 and not (resume / "q").exists(), r.stderr
    _work(resume)
    trees["resume"] = resume

    gguf = root / "gguf"
    gguf.mkdir()
    _tiny_gguf(gguf / "model.gguf")
    trees["gguf"] = gguf
    return trees


def _as_thebloke(q: Path) -> None:
    """A quantkit output rewritten as AutoGPTQ lays a checkpoint out: no manifest, card or index, one weight file
    named after the settings, which are in quantize_config.json only."""
    for name in ("quantkit.json", "README.md", "model.safetensors.index.json"):
        (q / name).unlink()
    (q / "model-00001-of-00001.safetensors").rename(q / Path(TB_SHARD).name)
    config = json.loads((q / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    (q / "config.json").write_text(json.dumps(config))
    autogptq = {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent")}
    (q / "quantize_config.json").write_text(json.dumps(autogptq))


def _tiny_gguf(path: Path) -> None:
    """A small llama GGUF written with gguf-py: metadata, a tokenizer and float32 tensors."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [bytes([97 + i]) for i in range(13)])
    w.add_token_scores([0.0] * 16)
    w.add_token_types([2, 3, 3] + [1] * 13)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (16, 16)), ("output_norm.weight", (16,)), ("output.weight", (16, 16)),
                        ("blk.0.attn_norm.weight", (16,)), ("blk.0.attn_q.weight", (16, 16)),
                        ("blk.0.attn_k.weight", (16, 16)), ("blk.0.attn_v.weight", (16, 16)),
                        ("blk.0.attn_output.weight", (16, 16)), ("blk.0.ffn_norm.weight", (16,)),
                        ("blk.0.ffn_gate.weight", (32, 16)), ("blk.0.ffn_up.weight", (32, 16)),
                        ("blk.0.ffn_down.weight", (16, 32))):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tree_digest(root: Path) -> str:
    """Names, kinds, link targets and contents of everything under root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            h.update(b"L" + os.readlink(path).encode())
        elif path.is_file():
            h.update(b"F" + path.read_bytes())
        else:
            h.update(b"D")
    return h.hexdigest()


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 300, len(CORPUS)
    assert len({c.name for c in CORPUS}) == len(CORPUS)


def test_every_damaged_input_is_one_error_line_and_touches_nothing_else(pristine, tmp_path, monkeypatch):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "secret.txt").write_text("API_KEY=hunter2\n")
    (decoy / "victim").mkdir()
    (decoy / "victim" / "precious.bin").write_bytes(os.urandom(64))
    (decoy / "secret.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    failures: list[str] = []
    runner = CliRunner()
    for i, case in enumerate(CORPUS):
        case_dir = tmp_path / f"c{i}"
        shutil.copytree(pristine[case.fixture], case_dir, symlinks=True)
        shutil.rmtree(decoy / "victim-repo", ignore_errors=True)  # what the previous case made of it
        case.damage(case_dir, decoy)
        before = _tree_digest(decoy)
        monkeypatch.setenv("HF_HUB_CACHE", str(case_dir / "hub"))
        monkeypatch.chdir(case_dir)
        result = runner.invoke(cli, case.command(case_dir))
        stderr = result.stderr.strip().splitlines()
        problem = None
        if case.repairs:
            if result.exit_code != 0 or result.exception is not None:
                problem = f"exit {result.exit_code} where the command repairs the damage: {result.output[-300:]}"
        elif result.exit_code not in (1, 2):
            problem = f"exit {result.exit_code}"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            problem = f"raised {type(result.exception).__name__}: {result.exception}"
        elif len(stderr) != 1 or not stderr[0].startswith("Error:") or "Traceback" in result.output:
            problem = f"stderr {stderr[-3:]}"
        if _tree_digest(decoy) != before:
            problem = f"{problem + '; ' if problem else ''}changed the decoy tree"
        if problem:
            failures.append(f"{case.name}: {problem}")
        shutil.rmtree(case_dir, ignore_errors=True)
    assert not failures, f"{len(failures)} of {len(CORPUS)} cases:\n" + "\n".join(failures)

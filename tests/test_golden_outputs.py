"""The bytes quantkit writes are pinned: the same command on the same tiny model writes files with exactly these
sha256 digests. A refactor that changes one output byte fails here. The digests were recorded with torch 2.13.0 on
CPU (float32 sums differ between torch builds and devices, so other builds skip)."""
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import cli_run, make_tiny_model

RECORDED_TORCH = "2.13.0"
FAST = ("--samples", "8", "--seq-len", "32")

# every file of the output directory: name -> sha256, recorded on main at 183c1ca; quantkit.json re-recorded when
# QuantSpec gained the Mixture-of-Experts settings (expert_chunk, expert_min_tokens), and again when it gained
# exact_sums: each time the settings it records were its only change
GOLDEN: dict[str, dict[str, str]] = {
    "4bit-g32-act-order": {
        "README.md": "4353e5b62603fb4ab38b06339da4c81eacae71e2922805486e68655eeac02b02",
        "config.json": "20ebb5c44fcd8ef4d3848136e54a8ad91aed895938a85462a7484c0af0b57287",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "64808957b462280728f04745674df72ee82cd9f5a1eb65984397201e9ad1319c",
        "model.safetensors.index.json": "183020bcce4ed270b6ac702054907cf9d546d8abdd81a77e8a350fe6fef7e4bd",
        "quantize_config.json": "ad3933cc5c9321454230471dc1bfe99857cde89a3eec7b17b0f6397ed84ce4fe",
        "quantkit.json": "02cb1ce57927362e81be943d4db43b9a120d9601e095753684967f7aa960b193",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "3bit-g32-asym-plain": {
        "README.md": "594020b04faa27aae9ffada9752d41a9ae385e36f279e644c80a32dba0ba96e9",
        "config.json": "5eacbf87c6a8ceb4b71275426e2aeb9d76dee3ff58165cf812a0210c767acacb",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "8570bcb306b741723962ccc8e19053f107769c23cd39b92de321f7f02d2dff2a",
        "model.safetensors.index.json": "b2d3fee48fae514f88d13088a8f32b74de0a27b219e6b780b8d7b8e758c30fec",
        "quantize_config.json": "e70940061904fc79594be2e601bc4e0f4753907cbe8d8cd48a9c72763d25292b",
        "quantkit.json": "b318244f0d79b7e69111d12bf85a624daa526f8b283971cc039269b1b354b579",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "8bit-per-row-static": {
        "README.md": "201c4eb564a9b57e1490ff2ed9432ffb91563e2b5a8e4cff03631a2c3cf487c8",
        "config.json": "42d2a6d5b7acf8abf8b7849e8f37ab2dae8dd757e411f27c1c211f6a2988b2cb",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "0bcc317daca88d331f84e8e9d827c860884ed2ed79811dc0f8c29667415359da",
        "model.safetensors.index.json": "fe350574e4331cb298e2a28998953f716dcdeb0b90236c2fb8e3b91d1471b0f0",
        "quantize_config.json": "2f9f443056b30bb2f2bec954a22829bc4db90cbb65cb289523f2163be51cf3f2",
        "quantkit.json": "76667fb712b8031e613c5ced7070247241f6d7f26ce60ee36f45193b4541d402",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "2bit-g64-no-clip": {
        "README.md": "0ff6025ec4278b31a7a3db83111601a872a2821a7e39d4528a18944a7b8921b4",
        "config.json": "8f0d46dfede8bb72195dad3e184479f9613f9b90483b153f80927f2ce89be5be",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "a7a9dd33883c8e360bd10b389d823cf6ebdf2e5ebb06297f5de6987941033fa2",
        "model.safetensors.index.json": "d2dfef3cb5e793c9ce6cc701b3668a2dd54d361187cbb11c0c397c56453cf19f",
        "quantize_config.json": "0fc4d4107b8f53d86130d673d16ad93c7882f62d12148ee4a717a5093d3a21d9",
        "quantkit.json": "04bf094778433bde90c90b1f2e504176be3905129e59444bfe820d24488d553c",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "4bit-gptaq": {
        "README.md": "a8000014c302a48e29163c8f5093821aa798dd710c18ae875ff4d0b4a39bcbd2",
        "config.json": "20ebb5c44fcd8ef4d3848136e54a8ad91aed895938a85462a7484c0af0b57287",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "a486c7373d74e326defa7dc1a4cfedf3fb0039766c82563f86cfb7cc8c4b5207",
        "model.safetensors.index.json": "183020bcce4ed270b6ac702054907cf9d546d8abdd81a77e8a350fe6fef7e4bd",
        "quantize_config.json": "ad3933cc5c9321454230471dc1bfe99857cde89a3eec7b17b0f6397ed84ce4fe",
        "quantkit.json": "7ceb86db6bafb25556496e0884d959e0c85e6786a0d0cd637ff5f98316712c29",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "4bit-rtn": {
        "README.md": "1925ba19b89eb12a432f723f5fd5e868bde733b9da9b0fc2e4ceecf1cd5470ec",
        "config.json": "8158a203daf37b91709736ce958fdc50002f5ad1db8c357b09fe60de6b2a3ab3",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "7c6f021d0bae951bb8ddb4deec7107a420c8939b77f77bf52729a2339816d7a2",
        "model.safetensors.index.json": "183020bcce4ed270b6ac702054907cf9d546d8abdd81a77e8a350fe6fef7e4bd",
        "quantize_config.json": "b457bc02712a506ef2697b3d7be20cda9cc3b77614d3317f3151cf3f56572543",
        "quantkit.json": "5ea5103717a46ee97a458a7f4cebafc5cccce0fe37aef81ebd7462c6409f2751",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "4bit-lm-head-skip": {
        "README.md": "ed148aee71ad7034a2e108c83c77d2ab43819d7c7203ef847c7d30e91e3a169f",
        "config.json": "233e2c080e41c237ba34288237f2a29f1a4edaacc491b2b518ba8ecba3ff5642",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00001.safetensors": "38aa5ef68f3218d7e455815c6188c25b6d081f6532065d87ad53a44e75bfb98d",
        "model.safetensors.index.json": "a6bd4c5d32107c1554c536a704489b1b5a5fa8adcc69435ac76042dce0913f4c",
        "quantize_config.json": "d322794ce4b7b36bf76b741c91fe317bdc99ed2cdd2ada0536e41a21051cf4d6",
        "quantkit.json": "a90f0eee764b3a1d3cf9b42daa82912d70c6f1810844a40f491001e59cb9fb1b",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
    "4bit-sharded": {
        "README.md": "2880184537b63f48612b1f935d04ed72e29a6c30bc56d87aad13ee6b3cd1826d",
        "config.json": "34001d522924b59948594511675667d68679f39e539dddcf9cc688826ba8ba6e",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00004.safetensors": "07c3d1c55f125a242d8e24046ba8bbe993c9c7d8e2d84c88a8a776ce4b997467",
        "model-00002-of-00004.safetensors": "f06673d77d4f40671a4647d9334f183f3c0d6ddc5b50cf046d4652dae02c2ccf",
        "model-00003-of-00004.safetensors": "22a3860b1584c787ed4d922f92f774fa542c49fc37a38606c7d281383bbfe53f",
        "model-00004-of-00004.safetensors": "e9fb7016e69001dbfabdea40c2d2280a04f9a177f29335a62e8202c7206dbc9c",
        "model.safetensors.index.json": "1d0452c3493397c5ec687c58e73b151ad0f2c1b6838da9a67bfc0c5c62ff71ff",
        "quantize_config.json": "1da42fe2386808febe0ded68fa647f3f8a48613f48e7007a07c145862c76cbb9",
        "quantkit.json": "a885db8756761c57787e2e6ad4b26b1be83a8b6fac042b4b2bfbb276357c79b2",
        "tokenizer.json": "8ef0096c09d952db79011679e71e519f3f04952edf04525a34c6a212f44411b9",
        "tokenizer_config.json": "a32c88a67297bb9c99d8240afc75b2fe99869ae991cbcc1b0d1aacb91d32bb6b",
    },
}

VARIANTS = {
    "4bit-g32-act-order": ("--bits", "4", "--group-size", "32"),
    "3bit-g32-asym-plain": ("--bits", "3", "--group-size", "32", "--asym", "--no-act-order"),
    "8bit-per-row-static": ("--bits", "8", "--group-size", "-1", "--static-groups"),
    "2bit-g64-no-clip": ("--bits", "2", "--group-size", "64", "--no-clip-search", "--no-true-sequential"),
    "4bit-gptaq": ("--bits", "4", "--group-size", "32", "--gptaq"),
    "4bit-rtn": ("--method", "rtn", "--bits", "4", "--group-size", "32"),
    "4bit-lm-head-skip": ("--bits", "4", "--group-size", "32", "--lm-head", "--skip", "mlp.down_proj"),
    "4bit-sharded": ("--bits", "4", "--group-size", "64", "--max-shard-size", "60KB"),
}


@pytest.fixture(scope="module")
def golden_base(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("golden") / "base", tiny_tokenizer)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(folder: Path, base: Path) -> dict[str, str]:
    """sha256 of every file; README.md and quantkit.json name the base by its absolute path, which is written as
    BASE first (and README.md's record inside quantkit.json, its sha256 and size, becomes that of the normalized README.md)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    readme = files["README.md"]
    files["README.md"] = readme.replace(str(base).encode(), b"BASE")
    record = b'"sha256": "%s",\n      "size": %d'
    files["quantkit.json"] = (files["quantkit.json"].replace(str(base).encode(), b"BASE")
                              .replace(record % (sha256(readme).encode(), len(readme)),
                                       record % (sha256(files["README.md"]).encode(), len(files["README.md"]))))
    return {name: sha256(data) for name, data in files.items()}


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__.split("+")[0] != RECORDED_TORCH, reason=f"digests recorded with torch {RECORDED_TORCH}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_are_byte_identical_to_the_recorded_ones(variant, golden_base):
    out = golden_base.parent / f"q-{variant}"
    r = cli_run("quantize", golden_base, "--out", out, *FAST, *VARIANTS[variant])
    assert r.exit_code == 0, r.output
    assert digests(out, golden_base) == GOLDEN[variant]

"""scripts/bench/gguf_vs_llamacpp.py's readers of llama.cpp's tool output, on text those tools printed."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "bench"))
from gguf_vs_llamacpp import parse_chunks, parse_decoded, parse_final_ppl, parse_kld  # noqa: E402

# The end of `llama-perplexity --kl-divergence` (llama.cpp 0c1e570) on a Q4_K_M file, its per-chunk table cut to
# its last row: the table's columns carry the same "±" and "%" as the summary lines.
KLD_LOG = """\
0.00.181.710 I kl_divergence: computing over 32 chunks, n_ctx=512, batch_size=2048, n_seq=4
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              \u0394p RMS            Same top p
  32       5.6069 \u00b1    0.1459       0.02474 \u00b1    0.00252       0.02378 \u00b1    0.00037     4.865 \u00b1  0.088 %    93.272 \u00b1  0.277 %

====== Perplexity statistics ======
Mean PPL(Q)                   :   5.606858 \u00b1   0.145893
Mean PPL(base)                :   5.469862 \u00b1   0.142010
Cor(ln(PPL(Q)), ln(PPL(base))):  99.53%
Mean ln(PPL(Q)/PPL(base))     :   0.024737 \u00b1   0.002524
Mean PPL(Q)/PPL(base)         :   1.025045 \u00b1   0.002587
Mean PPL(Q)-PPL(base)         :   0.136995 \u00b1   0.014504

====== KL divergence statistics ======
Mean    KLD:   0.023783 \u00b1   0.000365
Maximum KLD:   0.729301
Median  KLD:   0.014418
Minimum KLD:  -0.000001

====== Token probability statistics ======
Mean    \u0394p: -0.908 \u00b1 0.053 %
RMS \u0394p    :  4.865 \u00b1 0.088 %
Same top p: 93.272 \u00b1 0.277 %
"""


def test_the_summary_not_the_table():
    k = parse_kld(KLD_LOG)
    assert k == {"ppl_q": 5.606858, "ppl_q_err": 0.145893, "ppl_base": 5.469862, "ppl_base_err": 0.142010,
                 "ppl_ratio": 1.025045, "ppl_ratio_err": 0.002587, "mean_kld": 0.023783, "mean_kld_err": 0.000365,
                 "same_top_p": 93.272, "same_top_p_err": 0.277}


def test_lines_are_read_by_name_not_by_order():
    lines = KLD_LOG.splitlines()
    ratio = next(i for i, line in enumerate(lines) if line.startswith("Mean PPL(Q)/PPL(base)"))
    moved = [lines[ratio], *lines[:ratio], *lines[ratio + 1:]]
    assert parse_kld("\n".join(moved)) == parse_kld(KLD_LOG)


def test_a_file_against_itself_reads_negative_zero():
    # the base's log-probabilities are stored rounded to 16 bits, so f16 against its own logits prints -0.000000
    text = KLD_LOG.replace("Mean    KLD:   0.023783 \u00b1   0.000365", "Mean    KLD:  -0.000000 \u00b1   0.000000")
    text = text.replace("Same top p: 93.272 \u00b1 0.277 %", "Same top p: 100.000 \u00b1 0.000 %")
    k = parse_kld(text)
    assert k["mean_kld"] == 0.0 and k["same_top_p"] == 100.0


def test_a_missing_summary_is_named():
    plain = "0.02.10.358 I Final estimate: PPL = 5.4700 +/- 0.14203\n"
    with pytest.raises(ValueError, match=r"^no ppl_q, ppl_base, ppl_ratio, mean_kld, same_top_p in "):
        parse_kld(plain)
    cut = KLD_LOG.split("====== Token probability statistics")[0]
    with pytest.raises(ValueError, match=r"^no same_top_p in "):
        parse_kld(cut)


def test_chunks_ppl_and_decoded_tokens():
    assert parse_chunks("0.00.253.150 I compute_imatrix: computing over 128 chunks, n_ctx=512, batch_size=2048") == 128
    assert parse_chunks("I perplexity: calculating perplexity over 32 chunks, n_ctx=512, batch_size=2048") == 32
    assert parse_chunks(KLD_LOG) == 32
    assert parse_chunks("compute_imatrix: tokenizing the input ..") is None
    assert parse_final_ppl("0.02.10.358 I Final estimate: PPL = 5.4700 +/- 0.14203") == 5.47
    assert parse_final_ppl(KLD_LOG) is None
    assert parse_decoded("main: decoded 24 tokens in 1.05 s, speed: 22.78 t/s") == 24
    assert parse_decoded("main: error: unable to load model") is None

"""scripts/bench/peers.py's verdict on the Performance issue's bar: each measure against the best peer on it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "bench"))
from peers import targets  # noqa: E402

PEERS = [{"tool": "llmcompressor", "wall_s": 315.0, "peak_rss_mb": 1900.0, "ppl": 8.19},
         {"tool": "gptqmodel", "wall_s": 266.0, "peak_rss_mb": 1183.0, "ppl": 7.596}]


def test_each_measure_is_judged_against_the_best_peer_on_it():
    lines = targets({"wall_s": 144.0, "peak_rss_mb": 825.0, "ppl": 7.386}, PEERS)
    wall, rss, ppl = (next(line for line in lines if line.startswith(f"- {m}:"))
                      for m in ("wall time", "peak RSS", "perplexity"))
    assert "gptqmodel's 266 s, 0.54x" in wall and wall.endswith("**not met**")
    assert "gptqmodel's 1183 MB, 0.70x" in rss and rss.endswith("**not met**")
    assert "gptqmodel's 7.596, 0.97x" in ppl and ppl.endswith(": met")


def test_the_bound_itself_is_met():
    lines = targets({"wall_s": 133.0, "peak_rss_mb": 591.5, "ppl": 7.596}, PEERS)
    assert all(line.endswith(": met") for line in lines if line.startswith("- ")), lines


def test_no_peers_no_verdict():
    assert targets({"wall_s": 1.0, "peak_rss_mb": 1.0, "ppl": 1.0}, []) == []

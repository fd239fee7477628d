"`tokprune demo` end to end on a tiny --n, and its helpers."
import json
import math
import pytest

from tokprune_nb import POLICIES
from tokprune_nb.apps import demo
from tokprune_nb.toyworld import ORACLES


def test_demo_end_to_end(tmp_path, capsys):
    js, png = tmp_path / "demo.json", tmp_path / "demo.png"
    rc = demo.main(["--n", "7", "--seed", "3", "--keeps", "1.0", "0.11", "--json", str(js), "--plot", str(png),
                    "--no-progress"])
    assert rc == 0
    out = json.loads(js.read_text())
    assert out["seed"] == 3 and out["n"] == 7
    recs = out["records"]
    assert len(recs) == 2 * (len(POLICIES) + len(ORACLES))
    assert {r["policy"] for r in recs} == set(POLICIES) | set(ORACLES)
    for r in recs:
        for k in ("policy", "keep", "accuracy", "accuracy_by_family", "kept_tokens", "llm_flops", "latency_ms"):
            assert k in r, k
        assert 0 <= r["accuracy"] <= 1 and set(r["accuracy_by_family"]) == {"local", "global"}
        assert r["kept_tokens"] == (144 if r["keep"] == 1.0 else 16)
        assert r["llm_flops"] > 0 and r["latency_ms"] > 0 and math.isfinite(r["latency_ms"])
    full = [r for r in recs if r["keep"] == 1.0]
    assert len({r["accuracy"] for r in full}) == 1          # keep=1.0 is the unpruned model for every policy
    assert len({r["llm_flops"] for r in full}) == 1
    small = next(r for r in recs if r["keep"] == 0.11)
    assert small["llm_flops"] < full[0]["llm_flops"] / 4
    assert png.exists() and png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "zspaprune" in printed and "LLM MFLOPs" in printed


def test_prefill_flops_match_helper():
    "The demo's FLOPs are the flops module's analytic prefill count with logits at one position (as in generate)."
    from tokprune_nb.toyworld import toy_configs
    from tokprune_nb.measure.flops import analytic_prefill_flops
    _, cfg = toy_configs()
    n = 160
    assert demo.llm_prefill_flops(cfg, n) == analytic_prefill_flops(cfg, n, lm_head_tokens=1)
    assert demo.llm_prefill_flops(cfg, n) < analytic_prefill_flops(cfg, n)
    assert demo.llm_prefill_flops(cfg, 2 * n) > 2 * demo.llm_prefill_flops(cfg, n) - 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="`name`"): demo.make_policy("nope", 0.5)
    with pytest.raises(ValueError, match="`policies`"): demo.run_demo(n=7, policies=["nope"], progress=False)
    with pytest.raises(ValueError, match="`n`"): demo.run_demo(n=0, progress=False)

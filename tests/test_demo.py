"`tokprune demo` end to end on a tiny --n, and its helpers."
import json
import math
import pytest

from tokprune_nb import POLICIES
from tokprune_nb.apps import demo
from tokprune_nb.toyworld import ORACLES
from tokprune_nb.merging import MERGING
from tokprune_nb.inllm.methods import INSIDE


def test_demo_end_to_end(tmp_path, capsys):
    js, png = tmp_path / "demo.json", tmp_path / "demo.png"
    rc = demo.main(["--n", "7", "--seed", "3", "--keeps", "1.0", "0.11", "--json", str(js), "--plot", str(png),
                    "--no-progress"])
    assert rc == 0
    out = json.loads(js.read_text())
    assert out["seed"] == 3 and out["n"] == 7
    recs = out["records"]
    # every default method at both budgets, except in-LLM ones at 0.11: a 3-layer LM cannot reach it at equal FLOPs
    assert {(r["policy"], r["keep"]) for r in recs} == {(p, k) for p in demo.DEFAULT_METHODS for k in (1.0, 0.11)
                                                        if not (p in INSIDE and k == 0.11)}
    assert set(POLICIES) | set(ORACLES) | set(MERGING) | set(INSIDE) <= {r["policy"] for r in recs}
    for r in recs:
        for k in ("policy", "keep", "accuracy", "accuracy_by_family", "kept_tokens", "llm_flops", "latency_ms", "kind"):
            assert k in r, k
        assert 0 <= r["accuracy"] <= 1 and set(r["accuracy_by_family"]) == {"local", "global"}
        assert r["kept_tokens"] == (144 if r["keep"] == 1.0 else 16)
        assert r["kind"] == ("inside" if r["policy"] in INSIDE else "merge" if r["policy"] in MERGING or "+merge" in r["policy"]
                             else "oracle" if r["policy"] in ORACLES else "select")
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


def test_in_llm_and_merging_methods_by_name():
    "Merging and in-LLM methods are demo methods; in-LLM ones are set to equal FLOPs and their FLOPs count per layer."
    from tokprune_nb.inllm.methods import image_share
    from tokprune_nb.toyworld import toy_configs
    p = demo.make_policy("zspaprune+merge", 0.25)
    assert p.merge_pruned and p.keep == 0.25
    assert demo.make_policy("visionzip", 0.25).name == "visionzip"
    for name in INSIDE:
        pol = demo.make_policy(name, 0.5)
        assert abs(image_share(pol, 3) - 0.5) < 1e-6, (name, pol)
    with pytest.raises(ValueError, match="cannot be met"): demo.make_policy("fastv", 0.11)
    _, cfg = toy_configs()
    assert demo.llm_prefill_flops(cfg, [160] * 3) == demo.llm_prefill_flops(cfg, 160)
    assert demo.llm_prefill_flops(cfg, [160, 100, 100]) < demo.llm_prefill_flops(cfg, 160)
    with pytest.raises(ValueError, match="n_tokens"): demo.llm_prefill_flops(cfg, [160] * 2)


def test_in_llm_demo_counts_per_layer():
    "An in-LLM row reports the mean image tokens per layer and the FLOPs of the per-layer sequence lengths."
    from tokprune_nb.toyworld import load_toy, make_examples
    toy = load_toy(); ex = make_examples("test", 7, seed=1)
    r = demo.evaluate(toy, ex, demo.make_policy("fastv", 0.5))
    assert r["kept_tokens"] == pytest.approx((144 + 36 + 36) / 3)
    full = demo.evaluate(toy, ex)
    assert r["llm_flops"] < full["llm_flops"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="`name`"): demo.make_policy("nope", 0.5)
    with pytest.raises(ValueError, match="`policies`"): demo.run_demo(n=7, policies=["nope"], progress=False)
    with pytest.raises(ValueError, match="`n`"): demo.run_demo(n=0, progress=False)

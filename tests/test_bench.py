"""`tokprune bench`: end to end on `tiny`, FLOPs-only records, the GPU code paths (with a fake CUDA), bad input."""
import json, math
import pytest
import torch

import tokprune_nb.measure.bench as B
from tokprune_nb.measure.bench import (main, bench, build_case, run_once, flops_records, write_json, plot, parse_keeps,
                               Timer, PeakMemory, KeepAll, TimedPolicy, make_policy, kv_cache_mb, Case, REQUIRED_FIELDS)
from tokprune_nb.registry import adapter_class, families, published_configs


def test_cli_tiny_end_to_end(tmp_path):
    out, fig = tmp_path / "bench-test.json", tmp_path / "bench.png"
    rc = main(["--arch", "tiny", "--keep", "1,0.5,0.25", "--policies", "zspaprune,random", "--repeats", "2",
               "--new-tokens", "4", "--threads", "1", "--json", str(out), "--plot", str(fig), "--no-progress",
               "--machine", "test-cpu", "--note", "pytest"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["machine"] == "test-cpu" and doc["note"] == "pytest"
    recs = doc["records"]
    assert [(r["policy"], r["keep"]) for r in recs] == [("none", 1.0)] + [(p, k) for p in ("zspaprune", "random")
                                                                          for k in (1.0, 0.5, 0.25)]
    for r in recs:
        assert set(REQUIRED_FIELDS) <= set(r)
        for k in ("prefill_ms", "generate_ms", "peak_mem_mb", "select_ms", "llm_flops", "ideal_speedup"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] >= 0, k
        assert r["arch"] == "tiny" and r["prefill_ms"] > 0 and r["generate_ms"] > 0 and r["peak_mem_mb"] > 0
    base = recs[0]
    assert base["ideal_speedup"] == 1.0 and base["select_ms"] == 0.0 and base["kept_tokens"] == 16
    z = [r for r in recs if r["policy"] == "zspaprune"]
    assert [r["kept_tokens"] for r in z] == [16, 8, 4]
    assert z[0]["llm_flops"] == base["llm_flops"] and z[0]["seq_len"] == base["seq_len"]
    assert z[0]["llm_flops"] > z[1]["llm_flops"] > z[2]["llm_flops"]
    assert z[2]["ideal_speedup"] == pytest.approx(base["llm_flops"] / z[2]["llm_flops"])
    assert all(r["select_ms"] > 0 for r in recs[1:])
    assert fig.stat().st_size > 1000


def test_json_merges_same_machine(tmp_path):
    p = tmp_path / "b.json"
    a = flops_records("llava-1.5-7b", keeps=(1.0, 0.25))
    write_json(p, a, "m1")
    doc = write_json(p, flops_records("qwen2.5-vl-7b", keeps=(0.25,)), "m1")
    assert len(doc["records"]) == len(a) + 2
    doc = write_json(p, a, "m1")                                   # same keys: replaced, not duplicated
    assert len(doc["records"]) == len(a) + 2
    doc = write_json(p, a, "m2")                                   # another machine: a new file content
    assert doc["machine"] == "m2" and len(doc["records"]) == len(a)


@pytest.mark.parametrize("arch,n_vis,extra", [("llava-1.5-7b", 576, 0), ("llava-next-7b", 2880, 48),
                                              ("qwen2.5-vl-7b", 576, 0)])
def test_flops_only_7b(arch, n_vis, extra, tmp_path):
    recs = flops_records(arch, keeps=(1.0, 0.5, 0.25, 0.111, 64))
    assert all(set(REQUIRED_FIELDS) <= set(r) for r in recs)
    assert [r["kept_tokens"] for r in recs] == [n_vis, n_vis, n_vis // 2, n_vis // 4, round(0.111 * n_vis), 64]
    s = [r["ideal_speedup"] for r in recs]
    assert s[0] == s[1] == 1.0 and s[1:] == sorted(s[1:])
    assert all(r["seq_len"] - r["kept_tokens"] == recs[0]["seq_len"] - n_vis for r in recs)
    assert main(["--arch", arch, "--flops-only", "--json", str(tmp_path / "f.json")]) == 0


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b"])
def test_7b_refused_on_cpu_built_on_meta(arch, capsys):
    assert main(["--arch", arch, "--no-progress"]) == 2
    assert "--device cuda" in capsys.readouterr().out
    c = build_case(arch, device="meta", dtype=torch.bfloat16)
    assert c.model.lm_head.weight.is_meta and c.model.lm_head.weight.dtype == torch.bfloat16
    assert c.inputs["input_ids"].device.type == "cpu"


def test_bad_arguments():
    for argv in (["--keep", "1.5"], ["--keep", "0"], ["--keep", "x"], ["--policies", "fastv"], ["--arch", "llava-13b"],
                 ["--device", "cuda"] if not torch.cuda.is_available() else ["--keep", "-1"]):
        with pytest.raises(SystemExit) as e: main(argv + ["--no-progress"])
        assert e.value.code == 2
    assert parse_keeps("1,0.5,0.111,64") == [1.0, 0.5, 0.111, 64]
    with pytest.raises(ValueError, match="repeats"): bench("tiny", repeats=0, progress=False)


def test_bfloat16_path_on_cpu():
    recs = bench("tiny", keeps=(0.25,), repeats=1, warmup=0, new_tokens=2, dtype=torch.bfloat16, progress=False, threads=1)
    assert [r["dtype"] for r in recs] == ["bfloat16"] * 2 and recs[1]["kept_tokens"] == 4
    assert recs[1]["kv_cache_mb"] == pytest.approx(kv_cache_mb(build_case("tiny").config, recs[1]["seq_len"] + 2))


def test_run_once_qwen():
    "The Qwen path of the benchmark (only a 7B arch on a GPU in the CLI) on the tiny Qwen model."
    from tokprune_nb.testing.tiny import tiny_qwen2_5_vl, tiny_qwen_inputs
    m, p = tiny_qwen2_5_vl()
    case = Case("tiny-qwen", m, m.config, dict(tiny_qwen_inputs(p, ["what color is the cat ?"])), p.tokenizer)
    ad = adapter_class(m)(m, tokenizer=p.tokenizer)
    r0 = run_once(case, KeepAll(), ad, "cpu", new_tokens=3)
    pol = TimedPolicy(make_policy("zspaprune", 0.25))
    r1 = run_once(case, pol, ad, "cpu", new_tokens=3)
    assert r0["kept_tokens"] == 16 and r1["kept_tokens"] == 4 and r0["seq_len"] - r1["seq_len"] == 12
    assert len(pol.times) == 3        # prepare, forward, generate: one selection each


@pytest.mark.parametrize("name", [f.name for f in families().values()])
def test_every_family_tiny_arch(name):
    "`--arch <family>-tiny` for every registered family: the family's own builders, one pruned configuration timed."
    case = build_case(f"{name}-tiny")
    assert case.family.name == name and (case.clip is not None) == case.family.clip_tower
    ad = adapter_class(case.model)(case.model, clip=case.clip, clip_tokenizer=case.clip_tokenizer, tokenizer=case.tokenizer)
    r0 = run_once(case, KeepAll(), ad, "cpu", new_tokens=2)
    r1 = run_once(case, TimedPolicy(make_policy("zspaprune", 0.25)), ad, "cpu", new_tokens=2)
    assert 0 < r1["kept_tokens"] < r0["kept_tokens"] and r1["seq_len"] < r0["seq_len"]


@pytest.mark.parametrize("arch", list(published_configs()))
def test_every_published_arch(arch):
    "Every registered published checkpoint: FLOPs-only records from its reference tokens, inputs built on meta."
    fam, pub = published_configs()[arch]
    recs = flops_records(arch, keeps=(1.0, 0.25))
    assert [r["kept_tokens"] for r in recs] == [pub.visual_tokens, pub.visual_tokens, round(0.25 * pub.visual_tokens)]
    c = build_case(arch, device="meta", dtype=torch.bfloat16)
    assert int((c.inputs["input_ids"] == c.config.image_token_id).sum()) == pub.visual_tokens + pub.extra_tokens
    assert c.family is fam


class FakeCuda:
    "Records the calls the GPU branches make."
    def __init__(self): self.calls, self.allocated, self.peak = [], 100 * 2**20, 0
    def synchronize(self, device=None): self.calls.append("sync")
    def reset_peak_memory_stats(self, device=None): self.calls.append("reset"); self.peak = self.allocated
    def memory_allocated(self, device=None): return self.allocated
    def max_memory_allocated(self, device=None): self.calls.append("max"); return self.peak + 50 * 2**20


def test_gpu_branches_with_fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    with Timer("cuda") as t: pass
    assert fake.calls == ["sync", "sync"] and t.ms >= 0
    fake.calls.clear()
    with PeakMemory("cuda") as pm: pass
    assert fake.calls == ["sync", "reset", "sync", "max"]
    assert pm.base_mb == 100 and pm.peak_mb == 150 and pm.delta_mb == 50
    fake.calls.clear()
    pol = TimedPolicy(KeepAll(), device="cuda")
    from tokprune_nb.core import TokenSet
    pol(TokenSet(torch.randn(5, 3)))
    assert fake.calls == ["sync", "sync"] and len(pol.times) == 1
    with Timer("cpu"): pass
    assert fake.calls == ["sync", "sync"]          # no CUDA calls for a CPU timer


# ---- in-LLM methods and merge variants ---------------------------------------------------------------------------
def test_cli_inside_methods(tmp_path, capsys):
    "`--inside`: the four in-LLM methods at the equal-FLOPs share of each keep (tiny: 2-layer LM, stage layer 1)."
    assert main(["--arch", "tiny", "--keep", "0.75,0.4", "--policies", "zspaprune", "--inside", "fastv,pdrop,sparsevlm,dart",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-progress", "--threads", "1",
                 "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "skipping in-LLM fastv at keep 0.4" in out and "fastv*" in out       # 0.4 < 1/2: one full layer of two
    recs = json.load(open(tmp_path / "i.json"))["records"]
    llm = [r for r in recs if r.get("stage") == "llm"]
    assert {r["policy"] for r in llm} == {"fastv", "pdrop", "sparsevlm", "dart"}
    for r in llm:
        assert len(r["layer_tokens"]) == 2 and r["layer_tokens"][1] < r["layer_tokens"][0] == r["seq_len"]
        assert r["mean_image_tokens"] == pytest.approx(16 * r["keep"], abs=0.51)   # rounding of counts
        assert r["ideal_speedup"] > 1 and r["scoring_flops"] > 0 and r["select_ms"] > 0
        assert r["ideal_generate_speedup"] < r["ideal_speedup"] and r["generate_vs_ideal"] > 0
    with pytest.raises(SystemExit): main(["--inside", "tome", "--no-progress"])


def test_merge_variants_by_name():
    assert B.make_policy("zspaprune+merge", 0.25).merge_pruned is True
    with pytest.raises(ValueError, match="unknown policy"): B.make_policy("fastv", 0.5)


def test_gpu_selection_check_script_on_cpu(tmp_path):
    """`scripts/gpu_selection_check.py` (issue 16's prepared device check) end to end on a CPU and a tiny model: the
    eager pass, the captured pass skipped with its reason (CUDA only), the cost model and one comparison row per
    configuration that selects."""
    import json, os, subprocess, sys
    from pathlib import Path
    out = tmp_path / "g.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_selection_check.py"
    r = subprocess.run([sys.executable, str(script), "--arch", "llava-tiny", "--device", "cpu", "--policies", "zspaprune,atp",
                        "--keep", "1,0.25", "--repeats", "1", "--new-tokens", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["machine"].endswith(f"cpu-{os.cpu_count()}core") and d["cuda"] is None
    assert d["same_geometry"] is False and d["cost_model_arch"] == "llava-1.5-7b" and d["complete"] is True
    assert [s["policy"] for s in d["skipped"]] == ["zspaprune", "atp"] and all("CUDA" in s["reason"] for s in d["skipped"])
    assert {(r["policy"], r["keep"]) for r in d["bench"]} == {("none", 1.0), ("zspaprune", 1.0), ("zspaprune", 0.25),
                                                               ("atp", 1.0), ("atp", 0.25)}
    assert {(r["policy"], r["keep"], r["mode"]) for r in d["cost_model"]} == {(p, k, "eager") for p in ("zspaprune", "atp") for k in (1.0, 0.25)}
    rows = {(c["policy"], c["keep"]): c for c in d["comparison"]}
    assert set(rows) == {("zspaprune", 0.25), ("atp", 0.25)}          # keep 1 selects nothing: no row
    for c in rows.values():
        assert c["mode"] == "eager" and c["select_ms"] > 0 and c["est_gpu_ms"] > 0
        assert abs(c["measured_share"] - c["select_ms"] / c["prefill_ms"]) < 1e-3
        assert abs(c["measured_over_estimated"] - c["select_ms"] / c["est_gpu_ms"]) < 1e-2
    assert "wrote" in r.stdout and "skipped captured zspaprune" in r.stdout


def test_gpu_selection_check_captured_pass_with_a_faked_gpu(tmp_path, monkeypatch):
    """The captured pass of `scripts/gpu_selection_check.py`, which only a GPU runs for real: with the device check
    faked and `aot_eager` instead of CUDA graphs, on a CPU. Each policy is benchmarked captured while the time budget
    allows, the rest is listed as skipped, and the comparison gets captured rows matched to the captured cost model."""
    import importlib.util, json
    from pathlib import Path
    import tokprune_nb.policies as P
    spec = importlib.util.spec_from_file_location("gsc", Path(__file__).resolve().parents[1] / "scripts" / "gpu_selection_check.py")
    g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
    monkeypatch.setattr(P, "_is_cuda", lambda d: True)
    monkeypatch.setattr(P, "_compile", lambda fn: torch.compile(fn, backend="aot_eager", dynamic=False))
    monkeypatch.setattr(P, "_CAPTURED", {})
    calls = []
    real = P.Policy._captured
    def spy(self, ts, k): calls.append(type(self).__name__); return real(self, ts, k)
    monkeypatch.setattr(P.Policy, "_captured", spy)
    out = tmp_path / "g.json"
    args = ["--arch", "llava-tiny", "--device", "cpu", "--policies", "atp,zspaprune", "--keep", "1,0.25", "--repeats", "1",
            "--new-tokens", "2", "--out", str(out)]
    assert g.main(args + ["--budget-s", "600", "--per-policy-s", "0"]) == 0
    d = json.loads(out.read_text())
    assert d["complete"] and d["skipped"] == [] and d["cuda"] is None and d["dtype"] == "float32"
    assert {"ATP", "ZSPAPrune"} <= set(calls)                       # the captured form really ran
    modes = {(c["policy"], c["mode"]) for c in d["comparison"]}
    assert modes == {(p, m) for p in ("atp", "zspaprune") for m in ("eager", "captured")}
    for c in d["comparison"]:
        assert c["gpu_share"] is not None and c["est_gpu_ms"] > 0
    cap = {(r["policy"], r["keep"]): r for r in d["cost_model"] if r["mode"] == "captured"}
    assert set(cap) == {("atp", 0.25), ("zspaprune", 0.25)} and all(r["captured"] for r in cap.values())
    assert g.main(args + ["--budget-s", "0"]) == 0                  # no time left: every captured pass is skipped
    d = json.loads(out.read_text())
    assert [s["policy"] for s in d["skipped"]] == ["atp", "zspaprune"] and all("time budget" in s["reason"] for s in d["skipped"])
    assert {c["mode"] for c in d["comparison"]} == {"eager"}


def test_ab_selection_script_against_head(tmp_path):
    """`scripts/ab_selection.py`: HEAD's package, extracted and renamed, timed against the working tree in one process on
    `llava-tiny`; a pre-LLM policy and an in-LLM method give one record each with the same kept tokens; a bad revision is
    refused by name."""
    import json, shutil, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists(): pytest.skip("needs the git checkout")
    out, script = tmp_path / "ab.json", root / "scripts" / "ab_selection.py"
    r = subprocess.run([sys.executable, str(script), "--base", "HEAD", "--arch", "llava-tiny", "--policies", "zspaprune",
                        "--keep", "0.5", "--inside", "fastv", "--inside-keep", "0.6", "--pairs", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert len(d["base"]) == 40 and d["arch"] == "llava-tiny"
    assert [(x["stage"], x["method"], x["keep"]) for x in d["records"]] == [("pre", "zspaprune", 0.5), ("llm", "fastv", 0.6)]
    for x in d["records"]:
        assert x["same_tokens"] is True and x["pairs"] == 3 and x["base_ms"] > 0 and x["new_ms"] > 0 and x["ratio"] > 0
    bad = subprocess.run([sys.executable, str(script), "--base", "no-such-rev"], capture_output=True, text=True, cwd=root)
    assert bad.returncode != 0 and "no-such-rev" in bad.stderr

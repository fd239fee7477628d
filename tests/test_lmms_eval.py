"""The lmms-eval path (issue 15): the `tokprune` model on the toy tasks gives exactly `tokprune demo`'s numbers on the
same questions, and `accelerate launch --num_processes 2` gives exactly the single-process result.

Needs the eval extra (`make eval-venv`, which `.ci/run` runs); skipped with that reason where lmms-eval is absent."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: `make eval-venv` installs the eval extra (CI does)")

from tokprune_nb.toyworld import load_toy, make_examples, assets_dir
from tokprune_nb.apps.demo import evaluate, make_policy
from tokprune_nb.eval.run import main as eval_main
from tokprune_nb.eval.toy_tasks import write_toy_tasks

N = 14                                   # held-out questions: every question type twice
POLICIES = ["uniform", "atp", "zspaprune"]
KEEPS = [0.5, 0.11]
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_tokprune_eval_equals_demo(tmp_path):
    "Every (policy, keep): lmms-eval's accuracy (overall, per family, per type), kept tokens and FLOPs = the demo's."
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert eval_main(["--n", str(N), "--policies", *POLICIES, "--keeps", *map(str, KEEPS), "--batch-size", "5",
                      "--json", str(js), "--plot", str(png)]) == 0
    recs = json.loads(js.read_text())["records"]
    assert [(r["policy"], r["keep"]) for r in recs] == [(p, k) for k in KEEPS for p in POLICIES]
    assert png.stat().st_size > 0
    toy, examples = load_toy(), make_examples("test", N, seed=0)
    for r in recs:
        d = evaluate(toy, examples, make_policy(r["policy"], r["keep"], seed=0))
        got = (r["accuracy"], r["accuracy_by_family"], r["accuracy_by_type"], r["kept_tokens"])
        assert got == (d["accuracy"], d["accuracy_by_family"], d["accuracy_by_type"], d["kept_tokens"]), r["params"]
        assert r["llm_flops"] == pytest.approx(d["llm_flops"], rel=1e-12)      # a mean of the same integers
        assert r["lmms_eval"]["exact_match,none"] == r["accuracy"]
    assert len({r["accuracy"] for r in recs}) > 1, "every grid point scored the same: the comparison would be vacuous"


def test_merging_and_in_llm_methods_equal_demo(tmp_path):
    "Merging (VisionZip, '<policy>+merge') and in-LLM methods (FastV at equal FLOPs) through lmms-eval = the demo's."
    js = tmp_path / "eval.json"
    names = ["visionzip", "zspaprune+merge", "fastv"]
    assert eval_main(["--n", str(N), "--policies", *names, "--keeps", "0.5", "--batch-size", "5", "--json", str(js)]) == 0
    recs = json.loads(js.read_text())["records"]
    assert [r["policy"] for r in recs] == names
    toy, examples = load_toy(), make_examples("test", N, seed=0)
    for r in recs:
        d = evaluate(toy, examples, make_policy(r["policy"], 0.5, seed=0))
        assert (r["accuracy"], r["accuracy_by_type"], r["kept_tokens"]) == (d["accuracy"], d["accuracy_by_type"], d["kept_tokens"]), r["policy"]
        assert r["llm_flops"] == pytest.approx(d["llm_flops"], rel=1e-12)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _lmms_eval(procs, tasks, out):
    args = ["-m", "lmms_eval", "--model", "tokprune",
            "--model_args", f"pretrained={assets_dir() / 'llava'},policy=zspaprune,keep=0.11",
            "--tasks", "tokprune_toy", "--include_path", str(tasks), "--batch_size", "4",
            "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    if procs == 1: cmd = [sys.executable, *args]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
               "--num_processes", str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.load(open(glob.glob(str(out / "*" / "*_results.json"))[0]))["results"]["tokprune_toy"]
    samples = [json.loads(l) for l in open(glob.glob(str(out / "*" / "*_samples_tokprune_toy.jsonl"))[0])]
    return r, res, {s["doc_id"]: (s["filtered_resps"], s["exact_match"], s["kept_tokens"], s["llm_flops"]) for s in samples}


def test_two_processes_equal_one(tmp_path):
    "`accelerate launch --num_processes 2 -m lmms_eval` (gloo on CPU): same metrics and same answer per question."
    tasks = tmp_path / "tasks"; write_toy_tasks(tasks, n=N)
    r1, one, s1 = _lmms_eval(1, tasks, tmp_path / "one")
    r2, two, s2 = _lmms_eval(2, tasks, tmp_path / "two")
    assert sorted(s1) == list(range(N)) and s1 == s2
    for k in ("exact_match,none", "kept_tokens,none", "llm_flops,none"): assert one[k] == pytest.approx(two[k], rel=1e-12), k
    ranks = r2.stdout + r2.stderr
    assert "7 samples" in ranks and "14 samples" not in ranks, "the two processes did not split the questions"

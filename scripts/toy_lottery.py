"""Seed lottery of the toy world v2 LM recipe (issue 17): score LM-stage runs of several seeds against the targets.

Each run is one seed's toy model: `shipped` (the shipped model itself), a directory written by `tokprune train-toy`
(a whole toy model: with `--from`, the shipped stages 1-2 (CLIP, tower, projector, word embeddings) and a new LM; without
it, all three stages from scratch), or one written by `scripts/toy_v2_probe.py` (`lm.pt`, `probe.json`: the shipped model
with that LM and `lm_head`). Every run is measured like `tests/test_toyworld.py` measures the shipped model: 700
held-out test questions through the processor and `generate` (`apps.demo.evaluate`), full model, the evidence
oracle at keep 0.5 and 0.25, random pruning at keep 0.11.

    python scripts/toy_lottery.py --run 1=shipped --run 2=/tmp/probe/s2 --run 3=/tmp/probe/s3 \\
        --json results/toy-v2-lottery-cpu-2core.json
"""
import argparse, json, os, time
import numpy as np, torch
from tokprune_nb import toyworld as tw
from tokprune_nb.apps.demo import evaluate, make_policy

TARGETS = dict(full_overall=0.95, full_per_type=0.90, oracle_gap=0.03, random_loss=0.15)

def load_run(spec:str):
    """The toy model of one run: `shipped`; a `tokprune train-toy` output directory (`toy.json`); or the shipped
    model with the LM of a `toy_v2_probe.py` directory (`lm.pt`, `probe.json`)."""
    if spec == "shipped" or os.path.exists(os.path.join(spec, "toy.json")):     # a whole model, with its toy.json
        toy = tw.load_toy(None if spec == "shipped" else spec)
        return toy, {"source": spec, "train_s": toy.meta.get("train_seconds"), "recipe": toy.meta.get("recipe")}
    toy = tw.load_toy()                                                         # the shipped model, a probe's LM
    sd = torch.load(os.path.join(spec, "lm.pt"))
    toy.llava.model.language_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("lm_head.")})
    toy.llava.lm_head.load_state_dict({k[len("lm_head."):]: v for k, v in sd.items() if k.startswith("lm_head.")})
    probe = json.load(open(os.path.join(spec, "probe.json")))
    return toy, {"source": spec, "train_s": round(probe["train_s"], 1), "args": probe["args"]}

def score(toy, n:int=700)->dict:
    "Per-type accuracies of the four conditions and the target checks."
    test = tw.make_examples("test", n, seed=0)
    out = {"full": evaluate(toy, test)["accuracy_by_type"]}
    for keep in (0.5, 0.25): out[f"oracle@{keep}"] = evaluate(toy, test, make_policy("oracle", keep))["accuracy_by_type"]
    rnd = evaluate(toy, test, make_policy("random", 0.11)); out["random@0.11"] = rnd["accuracy_by_type"]
    full = out["full"]; overall = float(np.mean(list(full.values())))
    gaps = {k: {t: round(out[k][t] - full[t], 3) for t in full} for k in ("oracle@0.5", "oracle@0.25")}
    checks = {"full_overall": overall >= TARGETS["full_overall"],
              "full_per_type": min(full.values()) >= TARGETS["full_per_type"],
              "oracle_gap": all(abs(g) <= TARGETS["oracle_gap"] + 1e-9 for v in gaps.values() for g in v.values()),
              "random_loss": overall - rnd["accuracy"] >= TARGETS["random_loss"]}
    return dict(out, overall=overall, random_overall=rnd["accuracy"], gaps=gaps, checks=checks, meets=all(checks.values()))

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True,
                   help="SEED=shipped or SEED=DIR (a `tokprune train-toy` or toy_v2_probe.py output)")
    p.add_argument("--note", default=None, help="how the runs were trained (stored in the JSON)")
    p.add_argument("--n-test", type=int, default=700); p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runs = []
    for r in a.run:
        seed, spec = r.split("=", 1); t0 = time.time()
        toy, info = load_run(spec)
        rec = dict(seed=int(seed), **info, **score(toy, a.n_test))
        runs.append(rec)
        print(f"seed {seed}: overall {rec['overall']:.3f}, min type {min(rec['full'].values()):.2f}, "
              f"random@0.11 {rec['random_overall']:.3f}, checks {rec['checks']} ({time.time() - t0:.0f} s)", flush=True)
    types = list(runs[0]["full"])
    spread = {c: {t: [min(r[c][t] for r in runs), max(r[c][t] for r in runs)] for t in types}
              for c in ("full", "oracle@0.5", "oracle@0.25")}
    res = dict(targets=TARGETS, n_test=a.n_test, machine=f"{os.uname().machine}-cpu-{os.cpu_count()}core",
               runs=runs, spread=spread, seeds_meeting=sum(r["meets"] for r in runs), seeds=len(runs))
    if a.note: res["note"] = a.note
    with open(a.json, "w") as f: json.dump(res, f, indent=1)
    print(f"{res['seeds_meeting']} of {res['seeds']} seeds meet every target -> {a.json}")

if __name__ == "__main__": main()

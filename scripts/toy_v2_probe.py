"""Toy world v2 probe (issue 17): train only the toy Llama on the shipped model's frozen tower + projector with a
given LM-stage dropout, and report full / oracle / random accuracy on held-out test questions during training.

Stages 1-2 (vision, projector) do not depend on the LM-stage dropout, so with `--seed 1` this is exactly stage 3 of
`train_toy(Recipe(seed=1, ...))`. Greedy first-word answers via `lm_inputs` (the demo's `generate` path agrees).

    python scripts/toy_v2_probe.py --seed 2 --out /tmp/probe/s2          # the shipped recipe (Recipe defaults), seed 2
"""
import argparse, json, time, sys
import numpy as np, torch
from tokprune_nb import toyworld as tw
from tokprune_nb.toyworld import train as T
from tokprune_nb.toyworld.models import _tower_tokens, _lm_hidden, lm_inputs, pixel_values
from tokprune_nb.toyworld import WORDS, QUESTION_TYPES, N_PATCHES, render, patch_targets
from tokprune_nb.policies import budget

def kept_sets(examples, how, keep, seed):
    g = np.random.RandomState(seed); out = []
    for e in examples:
        if how == "full": return None
        k = budget(keep, N_PATCHES)
        if how == "random": out.append(np.sort(g.choice(N_PATCHES, k, replace=False))); continue
        ev = np.nonzero(patch_targets(e.scene)["digit"] != 10)[0]; bg = np.setdiff1d(np.arange(N_PATCHES), ev)
        fill = g.choice(bg, max(0, k - len(ev)), replace=False)
        out.append(np.sort(np.concatenate([ev[:k], fill]).astype(np.int64)))
    return out

CONDS = [("full", 1.0), ("oracle", 0.5), ("oracle", 0.25), ("random", 0.11)]

@torch.no_grad()
def evaluate(llava, examples, batch=64):
    llava.eval(); res = {}
    z_all = [llava.model.multi_modal_projector(_tower_tokens(llava, pixel_values([render(e.scene) for e in examples[i:i + batch]])))
             for i in range(0, len(examples), batch)]
    for how, keep in CONDS:
        hits = {t: [] for t in QUESTION_TYPES}
        for j, i in enumerate(range(0, len(examples), batch)):
            ex = examples[i:i + batch]
            kept = kept_sets(ex, how, keep, seed=1000 + i)
            pred = llava.lm_head(_lm_hidden(llava, lm_inputs(llava, z_all[j], [[e] for e in ex], kept))[:, -1]).argmax(-1).tolist()
            for e, p in zip(ex, pred): hits[e.qtype].append(WORDS[p] == e.answer)
        r = {t: float(np.mean(v)) for t, v in hits.items()}
        r["all"] = float(np.mean([x for v in hits.values() for x in v]))
        res[f"{how}@{keep}"] = r
    return res

def main():
    p = argparse.ArgumentParser()
    d = T.Recipe()   # the defaults are the shipped recipe's (each run's JSON records its arguments)
    p.add_argument("--seed", type=int, default=d.seed); p.add_argument("--layers", type=int, default=d.lm_layers)
    p.add_argument("--steps", type=int, default=d.lm_steps); p.add_argument("--lr", type=float, default=d.lm_lr)
    p.add_argument("--dropout", default=d.dropout); p.add_argument("--drop-prob", type=float, default=d.drop_prob)
    p.add_argument("--obj-full-prob", type=float, default=d.obj_full_prob); p.add_argument("--obj-keep-min", type=float, default=d.obj_keep_min)
    p.add_argument("--bg-keep-power", type=float, default=d.bg_keep_power)
    p.add_argument("--n-test", type=int, default=350); p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=d.threads); p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    shipped = tw.load_toy()
    _, llava = tw.build_toy(a.seed, lm_layers=a.layers)
    T.reuse_stages(shipped, llava)
    r = T.Recipe(seed=a.seed, lm_layers=a.layers, lm_steps=a.steps, lm_lr=a.lr, dropout=a.dropout, drop_prob=a.drop_prob,
                 obj_full_prob=a.obj_full_prob, obj_keep_min=a.obj_keep_min, bg_keep_power=a.bg_keep_power, eval_every=a.eval_every, threads=a.threads)
    test = tw.make_examples("test", a.n_test, seed=0)
    log = []; t0 = time.time()
    def val(llava_, examples, batch=64):   # train_lm's validation hook: also the oracle / random conditions on test
        res = evaluate(llava_, test); res["time"] = time.time() - t0; log.append(res)
        print(json.dumps({k: (round(v["all"], 3), round(v["count"], 3)) if isinstance(v, dict) else round(v) for k, v in res.items()}), flush=True)
        out = dict(res["full@1.0"]); return out
    T.val_accuracy = val
    T.train_lm(llava, r, log=lambda m: print(m, flush=True))
    final = log[-1]
    print(json.dumps(final, indent=1))
    import os; os.makedirs(a.out, exist_ok=True)
    json.dump({"args": vars(a), "log": log, "train_s": time.time() - t0}, open(f"{a.out}/probe.json", "w"), indent=1)
    torch.save(llava.model.language_model.state_dict() | {"lm_head." + k: v for k, v in llava.lm_head.state_dict().items()}, f"{a.out}/lm.pt")

if __name__ == "__main__": main()

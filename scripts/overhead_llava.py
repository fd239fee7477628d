"""Overhead of pruned(...) on random LLaVA models (tiny and mid-size, LLaVA-1.5 token geometry), batch 1.

For each policy we time, median of repeats:
  T0  the unpruned forward (vision tower + projector + LM on all tokens),
  P   adapter.prepare: one vision pass (with hidden states), saliency/CLIP/prompt inputs, the policy, rebuilding inputs,
      split into V (the vision pass: the model's get_image_features), S (the policy call) and R = P - V - S
      (saliency / CLIP / prompt inputs, TokenSets, rebuilding the inputs),
  T1  the whole pruned forward (prepare + LM on the kept tokens).
The vision pass replaces the one the unpruned model does itself, so the *extra* work is P - V = S + R; it is
reported relative to T0 (median over repeats of the per-repeat ratio). CPU timings on a shared machine are noisy: read the ratios, not the milliseconds.

usage: python scripts/overhead_llava.py [--repeats 15] [--out results/overhead_llava.json] [--sizes tiny,mid]
"""
import argparse, json, os, platform, statistics, time
import torch
from tokprune_nb.inject import pruned
from tokprune_nb.registry import adapter_class
from tokprune_nb.testing.tiny import tiny_llava, mid_llava, tiny_inputs, tiny_images, tiny_clip
from tokprune_nb.policies import RandomPrune, RelevancePrune, ClsAttnPrune, ZSPAPrune, ATP


class Timed:
    "Wraps a policy, accumulating the time spent inside its __call__."
    def __init__(self, policy): self.policy, self.t = policy, 0.0
    def __getattr__(self, k): return getattr(self.policy, k)
    def __call__(self, ts):
        t = time.perf_counter(); out = self.policy(ts); self.t += time.perf_counter() - t
        return out


def measure(name, model, proc, image_size, repeats):
    """Interleaved repeats (unpruned forward, prepare, pruned forward) so that load changes hit all three alike;
    the vision pass and the policy are timed inside the same prepare calls. Medians of per-repeat values."""
    inputs = tiny_inputs(proc, ["what is in the image ?"], images=tiny_images(1, size=(image_size, image_size)))
    clip, ctok = tiny_clip(model)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    rows = []
    policies = {"RandomPrune": RandomPrune(keep=0.25), "RelevancePrune": RelevancePrune(keep=0.25),
                "ClsAttnPrune": ClsAttnPrune(keep=0.25), "ZSPAPrune": ZSPAPrune(keep=0.25), "ATP": ATP(keep=0.25)}
    for pname, pol in policies.items():
        kw = dict(clip=clip, clip_tokenizer=ctok, tokenizer=proc.tokenizer) if pname == "ATP" else {}
        adapter = adapter_class(model)(model, **kw)
        enc, vt = adapter._features, [0.0]       # the LLaVA adapter's vision pass (get_image_features)
        def timed_features(*a, **k):
            t = time.perf_counter(); out = enc(*a, **k); vt[0] = time.perf_counter() - t
            return out
        adapter._features = timed_features       # instance attribute on our own adapter object only
        timed = Timed(pol)
        rec = {k: [] for k in ("T0", "P", "V", "S", "T1")}
        with pruned(model, pol, **kw): model(**inputs)           # warm-up
        for _ in range(repeats + 1):
            t = time.perf_counter(); model(**inputs); t0 = time.perf_counter() - t
            timed.t = 0.0
            t = time.perf_counter(); adapter.prepare(timed, inputs, for_generate=False); p = time.perf_counter() - t
            with pruned(model, pol, **kw):
                t = time.perf_counter(); model(**inputs); t1 = time.perf_counter() - t
            for k, v in zip(rec, (t0, p, vt[0], timed.t, t1)): rec[k].append(v)
        rec = {k: v[1:] for k, v in rec.items()}               # drop the first (warm-up) repeat
        extra = [(p - v) / t0 for p, v, t0 in zip(rec["P"], rec["V"], rec["T0"])]
        ratio = [t1 / t0 for t1, t0 in zip(rec["T1"], rec["T0"])]
        med = {k: 1e3 * statistics.median(v) for k, v in rec.items()}
        R = statistics.median([p - v - s for p, v, s in zip(rec["P"], rec["V"], rec["S"])]) * 1e3
        rows.append(dict(model=name, policy=pname, visual_tokens=n_vis, kept=round(0.25 * n_vis), repeats=repeats,
                         unpruned_forward_ms=med["T0"], prepare_ms=med["P"], vision_pass_ms=med["V"],
                         policy_ms=med["S"], scoring_and_rebuild_ms=R, pruned_forward_ms=med["T1"],
                         extra_over_unpruned=statistics.median(extra), pruned_over_unpruned=statistics.median(ratio)))
        print(f"{name:5s} {pname:15s} N={n_vis:4d} T0={med['T0']:8.1f}ms  prepare={med['P']:8.1f}ms (vision {med['V']:7.1f}, "
              f"policy {med['S']:6.1f}, scoring+rebuild {R:6.1f})  extra/T0={statistics.median(extra):6.1%}  "
              f"pruned/unpruned={statistics.median(ratio):5.2f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 (default) is far less noisy on a shared CPU, 0 = torch default")
    ap.add_argument("--out", default="results/overhead_llava.json")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    rows = []
    if "tiny" in a.sizes:
        m, p = tiny_llava(); rows += measure("tiny", m, p, 28, a.repeats)
    if "mid" in a.sizes:
        m, p = mid_llava(); rows += measure("mid", m, p, 336, max(3, a.repeats // 3))
    meta = dict(machine=platform.platform(), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, device="cpu", batch=1, keep=0.25,
                note="CPU shared with other jobs: timings are noisy; ratios are what matters")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f: json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()

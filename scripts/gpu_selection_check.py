"""The GPU check of issue 16, prepared for a session that is lent a device: selection cost measured on the GPU, eager
and captured, next to the cost model's estimate of it (`tokprune bench-select --cost-model`).

It runs `tokprune bench` on a random-initialised 7B model (random weights time like real ones) for ZSPAPrune, ATP,
DivPrune and DPP at keep 1 / 0.25 / 0.111: once eager (`policies.CAPTURE = False`), then captured (CUDA graphs
through `torch.compile(mode="reduce-overhead")`, the package's default on CUDA), one policy at a time while the time
budget lasts (inductor's compile of an unrolled greedy loop is the slow part: a policy that would not fit is listed as
skipped, not silently dropped). Then the cost model for the same (arch, policy, keep), eager and captured, and one
comparison row per measured configuration: the measured selection share of the measured unpruned prefill against
the model's `gpu_share`, and measured against estimated milliseconds.

On the device machine: its image has torch and the other packages the script imports, but a transformers (5.17
when last read) older than this package's pin (>= 5.20), and nothing can be installed there from a registry. So carry
the wheel: `pip download "transformers==5.24.0" --no-deps -d .wheels` here (`.wheels/` is git-ignored; its deps
huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8 are in the image), then one device call:

    run(carry=[".wheels"], timeout_s=560, command="python3 -m pip install -q --no-deps --target /tmp/tf
        .wheels/transformers-*.whl && PYTHONPATH=/tmp/tf:. python3 scripts/gpu_selection_check.py
        --out $OUT/gpu-selection.json")

Then commit the JSON under `results/` (its name carries the device, e.g. `results/gpu-selection-nvidia-h200.json`).
On a CPU (`--device cpu`, a tiny arch) it runs the same steps without the captured pass (capture is CUDA-only): the
test suite checks the script that way.
"""
import argparse, json, os, sys, time
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's package
from tokprune_nb import policies as P
from tokprune_nb.measure import bench as B
from tokprune_nb.measure import selection_speed as S

POLICIES = ("zspaprune", "atp", "divprune", "dpp")   # the issue's four; captured in this order (cheapest compile first)
KEEPS = (1.0, 0.25, 0.111)


def run_bench(arch, policies, keeps, device, dtype, repeats, warmup, new_tokens, capture:bool)->list:
    "`bench` records with the package's captured form on (`capture`) or off."
    old = P.CAPTURE
    P.CAPTURE = capture
    try:
        recs = B.bench(arch, keeps, policies, device=device, dtype=dtype, repeats=repeats, warmup=warmup,
                       new_tokens=new_tokens, progress=False)
    finally: P.CAPTURE = old
    for r in recs: r["mode"] = "captured" if capture and r["policy"] != "none" and r["kept_tokens"] < r["n_visual"] else "eager"
    return recs


def cost_arch(arch:str)->str:
    "The cost model's geometry for `arch`: itself when the cost model knows it, else LLaVA-1.5-7B's (a CPU smoke run)."
    from tokprune_nb.measure.flops import ARCH_CONFIGS
    return arch if arch in ARCH_CONFIGS else "llava-1.5-7b"


def compare(measured:list, model:list)->list:
    "One row per measured (policy, keep, mode) with a selection: measured share and ms against the cost model's."
    est = {(r["policy"], r["keep"], r["mode"]): r for r in model}
    rows = []
    for r in measured:
        if r["policy"] == "none" or r["kept_tokens"] >= r["n_visual"]: continue   # nothing selected: nothing to compare
        m = est.get((r["policy"], r["keep"], r["mode"]))
        share = r["select_ms"] / r["prefill_base_ms"]
        rows.append(dict(policy=r["policy"], keep=r["keep"], mode=r["mode"], select_ms=round(r["select_ms"], 3),
                         prefill_ms=round(r["prefill_base_ms"], 3), measured_share=round(share, 5),
                         est_gpu_ms=None if m is None else m["est_gpu_ms"],
                         est_prefill_ms=None if m is None else m["prefill_ms"],
                         gpu_share=None if m is None else m["gpu_share"],
                         measured_over_estimated=None if m is None or not m["est_gpu_ms"] else round(r["select_ms"] / m["est_gpu_ms"], 3)))
    return rows


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llava-1.5-7b", help="a `tokprune bench --arch` name (default llava-1.5-7b)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--keep", default=",".join(map(str, KEEPS)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (a captured policy compiles in its first call)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock seconds for the whole run: a captured policy is started only while at least "
                        "--per-policy-s of it is left (default 420: a 10-minute device call with room to spare)")
    p.add_argument("--per-policy-s", type=float, default=90.0, help="what one captured policy is expected to take, compile included")
    p.add_argument("--out", required=True, help="the JSON to write")
    a = p.parse_args(argv)
    t0 = time.time()
    pols = [s for s in a.policies.split(",") if s]
    keeps = B.parse_keeps(a.keep)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    cuda = P._is_cuda(a.device)                     # captures (control flow): the package's own check, faked in tests
    gpu = torch.device(a.device).type == "cuda"     # what the device is (metadata)
    kw = dict(arch=a.arch, keeps=keeps, device=a.device, dtype=dtype, repeats=a.repeats, warmup=a.warmup,
              new_tokens=a.new_tokens)
    carch = cost_arch(a.arch)
    machine = B._machine(a.device)
    doc = dict(machine=machine, device=a.device, torch=torch.__version__,
               cuda=torch.version.cuda if gpu else None, arch=a.arch, cost_model_arch=carch,
               same_geometry=carch == a.arch,   # False: a smoke run (a tiny arch), its comparison checks plumbing only
               dtype=str(dtype or (torch.bfloat16 if gpu else torch.float32)).replace("torch.", ""),
               cost_model_constants=dict(launch_us=S.LAUNCH_US, sync_us=S.SYNC_US, graph_launch_us=S.GRAPH_LAUNCH_US,
                                         graph_node_us=S.GRAPH_NODE_US, peak_fraction=S.PEAK_FRACTION),
               complete=False, skipped=[], comparison=[], bench=[], cost_model=[])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    def save(**kv):   # after every step: a run stopped at its limit still leaves what it measured
        doc.update(kv, wall_s=round(time.time() - t0, 1))
        doc["comparison"] = compare(doc["bench"], doc["cost_model"])
        with open(a.out, "w") as f: json.dump(doc, f, indent=1)
    save(bench=run_bench(policies=pols, capture=False, **kw))
    print(f"eager pass: {len(doc['bench'])} records, {time.time() - t0:.0f} s", flush=True)
    model = []
    for cap in ([False, True] if cuda else [False]):
        for r in S.cost_model(archs=(carch,), keeps=keeps, policies=pols, progress=False, capture=cap):
            if cap and not r["captured"]: continue   # keep 1 selects nothing: counted once, eager
            r["mode"] = "captured" if r["captured"] else "eager"
            model.append(r)
    save(cost_model=model)
    print(f"cost model: {len(model)} records, {time.time() - t0:.0f} s", flush=True)
    if not cuda: doc["skipped"] = [dict(policy=n, reason="capture runs on CUDA only") for n in pols]
    else:
        for n in pols:
            left = a.budget_s - (time.time() - t0)
            if left < a.per_policy_s:
                doc["skipped"].append(dict(policy=n, reason=f"time budget: {left:.0f} s left of {a.budget_s:.0f}")); continue
            t1 = time.time()
            recs = run_bench(policies=[n], capture=True, **kw)
            save(bench=doc["bench"] + [r for r in recs if r["mode"] == "captured"])   # keep 1 and "none": as eager
            print(f"captured {n}: {time.time() - t1:.0f} s", flush=True)
    save(complete=True)
    rows = doc["comparison"]
    print(f"{'policy':10s} {'keep':>6s} {'mode':9s} {'select ms':>10s} {'share':>8s} {'est ms':>8s} {'est share':>9s} {'meas/est':>8s}")
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        print(f"{r['policy']:10s} {r['keep']:6.3f} {r['mode']:9s} {r['select_ms']:10.3f} {r['measured_share']:8.4f} "
              f"{f(r['est_gpu_ms'], '8.3f')} {f(r['gpu_share'], '9.4f')} {f(r['measured_over_estimated'], '8.2f')}")
    for s in doc["skipped"]: print(f"skipped captured {s['policy']}: {s['reason']}")
    print(f"wrote {a.out} ({machine}, {doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paired A/B timing of selection and in-LLM scoring: this checkout against a git revision, in one process.

The 2-core VM drifts by +-30% over minutes, so two separate `tokprune bench` runs cannot show a 10% change. This script
loads the package of `--base` (extracted with `git archive` and renamed `tokprune_base`) next to the working tree's
`tokprune_nb`, builds the same `mid` case with each, and times the two alternately (the order flips every call),
reporting medians and the median of the per-pair ratios new/base.

    python scripts/ab_selection.py --base ae35a00 --policies zspaprune,divprune --inside sparsevlm,dart --json out.json

Pre-LLM policies are timed on the TokenSet the adapter builds for the `mid` case (one image, 576 tokens); in-LLM
methods on the scoring steps of one prefill (`prepare`, `select`, `recycle`, `clusters`), at the equal-FLOPs share of
each `--inside-keep`. Both packages must produce the same kept indices; the script checks it."""
import argparse, importlib, io, json, os, platform, statistics, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract(rev:str, dest:Path)->str:
    "The package of git revision `rev` under `dest/tokprune_base` (every `tokprune_nb` reference renamed); its commit."
    commit = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=ROOT, capture_output=True, text=True)
    if commit.returncode: raise SystemExit(f"--base: {rev!r} is not a commit of {ROOT}")
    data = subprocess.run(["git", "archive", commit.stdout.strip(), "tokprune_nb"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t: t.extractall(dest, filter="data")
    (dest / "tokprune_nb").rename(dest / "tokprune_base")
    for f in (dest / "tokprune_base").rglob("*.py"):
        f.write_text(f.read_text().replace("tokprune_nb", "tokprune_base"))
    return commit.stdout.strip()


class Side:
    "One package's `mid` case: its TokenSet for pre-LLM policies and a scoring prefill for in-LLM methods."
    def __init__(self, pkg:str, arch:str):
        import torch
        self.b = importlib.import_module(pkg + ".measure.bench")
        self.base = importlib.import_module(pkg + ".inllm.base")
        case = self.b.build_case(arch)
        self.case = case
        self.ad = self.b.adapter_class(case.model)(case.model, clip=case.clip, clip_tokenizer=case.clip_tokenizer,
                                                   tokenizer=case.tokenizer)
        with torch.no_grad(): self.kw = self.ad.prepare(self.b.KeepAll(), case.inputs, for_generate=False).kwargs
        self.depth = self.b.text_config(case.config).num_hidden_layers
        self._ts = {}

    def tokenset(self, policy):
        "The TokenSet the adapter hands `policy` (captured once per set of needed fields)."
        import torch
        key = frozenset(policy.needs)
        if key not in self._ts:
            got = []
            class Capture(self.b.KeepAll):
                needs = key
                def __call__(s, ts): got.append(ts); return super().__call__(ts)
            with torch.no_grad(): self.ad.prepare(Capture(), self.case.inputs, for_generate=False)
            self._ts[key] = got[0]
        return self._ts[key]

    def select(self, name:str, keep:float):
        "A timed call of pre-LLM policy `name`: (ms, kept indices)."
        import torch
        p = self.b.make_policy(name, keep)
        ts = self.tokenset(p)
        with torch.no_grad():
            t0 = time.perf_counter(); out = p(ts); ms = (time.perf_counter() - t0) * 1e3
        return ms, (out if isinstance(out, torch.Tensor) else out.index)

    def score(self, name:str, keep:float):
        "The scoring steps of one prefill with in-LLM method `name`: (ms, kept indices per stage)."
        import torch
        tp = self.b.TimedInside(self.b.make_inside(name, keep, self.depth))
        runner = self.base.InsideRunner(self.case.model, tp.policy).install()
        try:
            runner.begin(self.kw["input_ids"] == self.ad.image_token_id, self.kw.get("attention_mask"))
            with torch.no_grad(): self.case.model(**self.kw, logits_to_keep=1, use_cache=True)
            kept = [[k.tolist() for k in stage] for stage in runner.kept]
        finally: runner.remove()
        return sum(tp.times), kept


def paired(fa, fb, n:int)->dict:
    "Time `fa` (base) and `fb` (new) alternately `n` times, the order flipping each time; check equal results."
    ra = rb = None
    ta, tb, rat = [], [], []
    for i in range(n):
        if i % 2: b, rb = fb(); a, ra = fa()
        else: a, ra = fa(); b, rb = fb()
        ta.append(a); tb.append(b); rat.append(b / a)
    same = (ra.tolist() == rb.tolist()) if hasattr(ra, "tolist") else ra == rb
    if not same: raise SystemExit("the two packages kept different tokens")
    return dict(base_ms=round(statistics.median(ta), 3), new_ms=round(statistics.median(tb), 3),
                ratio=round(statistics.median(rat), 3), same_tokens=True, pairs=n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD, ae35a00)")
    ap.add_argument("--arch", default="mid")
    ap.add_argument("--policies", default="zspaprune", help="comma-separated pre-LLM policies ('' for none)")
    ap.add_argument("--keep", default="0.25,0.111", help="budgets of the pre-LLM policies")
    ap.add_argument("--inside", default="", help="comma-separated in-LLM methods")
    ap.add_argument("--inside-keep", default="0.5,0.35", help="equal-FLOPs shares of the in-LLM methods")
    ap.add_argument("--pairs", type=int, default=31, help="timed pairs per configuration")
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args(argv)
    if a.pairs < 1: raise SystemExit("--pairs must be >= 1")
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        commit = extract(a.base, Path(tmp))
        sys.path.insert(0, tmp)
        base, new = Side("tokprune_base", a.arch), Side("tokprune_nb", a.arch)
        recs = []
        keeps, ikeeps = [float(k) for k in a.keep.split(",")], [float(k) for k in a.inside_keep.split(",")]
        jobs = [("pre", p, k) for p in filter(None, a.policies.split(",")) for k in keeps]
        jobs += [("llm", p, k) for p in filter(None, a.inside.split(",")) for k in ikeeps]
        print(f"{'stage':5s} {'method':18s} {'keep':>6s} {'base ms':>8s} {'new ms':>8s} {'new/base':>9s}")
        for stage, name, keep in jobs:
            fa = (lambda: base.select(name, keep)) if stage == "pre" else (lambda: base.score(name, keep))
            fb = (lambda: new.select(name, keep)) if stage == "pre" else (lambda: new.score(name, keep))
            try:
                for _ in range(2): fa(); fb()                   # warm-up: caches, allocator, lazy imports
            except ValueError as e:                             # e.g. an in-LLM share out of reach on a shallow LLM
                print(f"{stage:5s} {name:18s} {keep:6.3f} skipped: {e}"); continue
            r = dict(stage=stage, method=name, keep=keep, **paired(fa, fb, a.pairs))
            recs.append(r)
            print(f"{stage:5s} {name:18s} {keep:6.3f} {r['base_ms']:8.2f} {r['new_ms']:8.2f} {r['ratio']:9.3f}", flush=True)
    out = dict(what="paired A/B timing, this checkout vs --base (scripts/ab_selection.py)", command=" ".join(sys.argv),
               base=commit, arch=a.arch, machine=f"{platform.machine()}, {os.cpu_count()} cores", torch=torch.__version__,
               threads=torch.get_num_threads(), records=recs)
    if a.json: Path(a.json).write_text(json.dumps(out, indent=1) + "\n"); print("wrote", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

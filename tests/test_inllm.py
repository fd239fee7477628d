"""In-LLM pruning (tokprune_nb.inllm): the shared mechanism, FastV, PyramidDrop, SparseVLM and DART, on every registered
family it supports (a family is supported when `InsideRunner` accepts its tiny model; the others are refused up front).

Tiny random models with 4 decoder layers (the family's tiny config, deepened). FastV/DART stage at layer 2 (scoring
with layer 1), PyramidDrop at its default 1/2/3 of 4, SparseVLM scoring at its scaled layers 0/1/2 (stages 1/2/3)."""
from types import SimpleNamespace
import copy, math
import pytest
import torch
import tokprune_nb.inllm.base as inllm_base
from tokprune_nb.registry import families
from tokprune_nb.inject import pruned
from tokprune_nb.inllm.base import InsideRunner, Stage, check_stages, text_model
from tokprune_nb.inllm.fastv import FastV
from tokprune_nb.inllm.pdrop import PyramidDrop
from tokprune_nb.inllm.sparsevlm import SparseVLM
from tokprune_nb.inllm.dart import DART
from tokprune_nb.inllm.methods import INSIDE, equal_flops, image_share
from tokprune_nb.policies import RandomPrune

torch.set_grad_enabled(False)
PROMPTS = ["what is in the image ?", "how many dog are there on the left ?", "describe the image"]
SIZES = [(56, 56), (28, 84), (112, 112)]                                 # different image-token counts per row
K = 2
N_LAYERS = 4
METHODS = {"fastv": (FastV(layer=K, keep=0.5), FastV(layer=K, keep=1.0)),
           "pdrop": (PyramidDrop(ratio=0.5), PyramidDrop(ratio=1.0)),
           "sparsevlm": (SparseVLM(keep=(0.5, 0.25, 0.125)), SparseVLM(keep=(1.0, 1.0, 1.0))),
           "dart": (DART(layer=K, keep=0.5), DART(layer=K, keep=1.0))}


def build(f, seed:int=0, **kw):
    "The family's tiny model with a 4-layer language model (its config deepened, weights re-drawn from `seed`)."
    m, proc = f.tiny(seed, **kw)
    cfg = copy.deepcopy(m.config)
    tc = getattr(cfg, "text_config", cfg)
    tc.num_hidden_layers = N_LAYERS
    if getattr(tc, "layer_types", None): tc.layer_types = [tc.layer_types[-1]] * N_LAYERS
    torch.manual_seed(seed)
    model = type(m)(cfg).eval()
    model.generation_config = copy.deepcopy(m.generation_config)
    return model, proc


def _supported(f)->bool:
    try: InsideRunner(f.tiny(0)[0], FastV(layer=1, keep=0.5)); return True
    except (ValueError, TypeError): return False   # refused up front (DeepStack, linear attention, no LLaMA-style stack)

FAMS = [f for f in families().values() if _supported(f)]


def test_supported_families():
    "LLaVA, LLaVA-NeXT and Qwen2.5-VL at least; Qwen3-VL (DeepStack) and Qwen3.5 (linear attention) are refused."
    names = {f.name for f in FAMS}
    assert {"llava", "llava-next", "qwen2.5-vl"} <= names
    assert not names & {"qwen3-vl", "qwen3.5"}


@pytest.fixture(scope="module", params=FAMS, ids=lambda f: f.name)
def fx(request):
    f = request.param
    model, proc = build(f)
    x = dict(f.inputs(proc, PROMPTS, sizes=SIZES, seed=0))
    alone = [dict(f.inputs(proc, [p], sizes=[s], seed=i)) for i, (p, s) in enumerate(zip(PROMPTS, SIZES))]
    gen = dict(max_new_tokens=5, do_sample=False, suppress_tokens=list(f.adapter(model).special_token_ids()))
    return SimpleNamespace(f=f, model=model, proc=proc, x=x, alone=alone, gen=gen, img=model.config.image_token_id)


def lengths(model):
    "Register (after entering `pruned`, so they run after the stage's hooks) hooks recording each layer's input length."
    seen, hs = {}, []
    for l, layer in enumerate(text_model(model).layers):
        hs.append(layer.register_forward_pre_hook(
            lambda m, a, k, l=l: seen.setdefault(l, []).append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True))
    return seen, hs


def state(model):
    return dict(model.__dict__), {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


# ---- identity ------------------------------------------------------------------------------------------------
def test_keep_all_stage_is_bit_exact(fx):
    ref = fx.model(**fx.x).logits
    ref_g = fx.model.generate(**fx.x, **fx.gen)
    with pruned(fx.model, None, inside=FastV(layer=K, keep=1.0)) as ctx:
        assert torch.equal(fx.model(**fx.x).logits, ref)
        assert torch.equal(fx.model.generate(**fx.x, **fx.gen), ref_g)
        assert ctx.inside.kept is not None


def test_keep_all_through_the_gather_path_is_bit_exact(fx, monkeypatch):
    "With the shortcut off, an all-keeping stage still gathers hidden states, cos/sin and builds the mask: same numbers."
    monkeypatch.setattr(inllm_base, "IDENTITY_SHORTCUT", False)
    xi = fx.alone[0]
    ref = fx.model(**xi).logits; ref_g = fx.model.generate(**xi, **fx.gen)
    with pruned(fx.model, None, inside=FastV(layer=K, keep=1.0)):
        assert torch.equal(fx.model(**xi).logits, ref)
        assert torch.equal(fx.model.generate(**xi, **fx.gen), ref_g)
    # batched with padding: real positions agree with the unpruned model
    ref = fx.model(**fx.x).logits
    with pruned(fx.model, None, inside=FastV(layer=K, keep=1.0)) as ctx:
        out = fx.model(**fx.x).logits
    am = fx.x["attention_mask"].bool()
    torch.testing.assert_close(out[am], ref[am], atol=1e-6, rtol=1e-5)


# ---- what each layer sees ----------------------------------------------------------------------------------------
def test_stage_layer_sees_exactly_the_survivors(fx):
    ids, am = fx.x["input_ids"], fx.x["attention_mask"].bool()
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)) as ctx:
        seen, hs = lengths(fx.model)
        try: out = fx.model(**fx.x)
        finally:
            for h in hs: h.remove()
        kept = ctx.inside.kept[0]
    n_img = ((ids == fx.img) & am).sum(1); n_txt = (am & (ids != fx.img)).sum(1)
    want = [int(t) + max(1, int(torch.floor(0.5 * n + 0.5))) for t, n in zip(n_txt, n_img)]
    assert [k.numel() for k in kept] == want                                     # per sample: its text + its share
    for b, k in enumerate(kept):
        assert am[b, k].all() and ((ids[b, k] != fx.img).sum() == n_txt[b])     # every text token survives
    assert all(seen[l] == [ids.shape[1]] for l in range(K))                      # layers before the stage: all tokens
    assert all(seen[l] == [max(want)] for l in range(K, len(seen)))              # from the stage on: the survivors
    assert out.logits.shape[1] == max(want)


def test_selection_is_fastv_last_token_attention(fx):
    "The kept image tokens are the top ones of layer K-1's head-averaged attention of the last token (eager reference)."
    model, _ = build(fx.f, attn_implementation="eager")
    ids, am = fx.x["input_ids"], fx.x["attention_mask"].bool()
    with pruned(model, None) as c0:
        ref = model(**fx.x, output_attentions=True).attentions[K - 1]            # [B,H,L,L], unpruned
    with pruned(model, None, inside=FastV(layer=K, keep=0.5)) as ctx:
        model(**fx.x)
        kept = ctx.inside.kept[0]
    for b in range(ids.shape[0]):
        img = torch.nonzero((ids[b] == fx.img) & am[b]).flatten()
        score = ref[b, :, -1].float().mean(0)[img]
        k = max(1, math.floor(0.5 * img.numel() + 0.5))
        top = torch.sort(img[torch.sort(-score, stable=True).indices[:k]]).values
        assert torch.equal(kept[b][ids[b, kept[b]] == fx.img], top)


# ---- generate --------------------------------------------------------------------------------------------------
def test_batched_generate_equals_alone(fx):
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
        out = fx.model.generate(**fx.x, **fx.gen)
        for i, xi in enumerate(fx.alone):
            one = fx.model.generate(**xi, **fx.gen)
            assert torch.equal(out[i, -5:], one[0, -5:]), i


def test_generate_cache_equals_no_cache(fx):
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
        out = fx.model.generate(**fx.x, **fx.gen)
        nocache = fx.model.generate(**fx.x, **fx.gen, use_cache=False)
    assert torch.equal(out, nocache)


def test_decode_steps_attend_to_the_shortened_cache(fx):
    "Decode steps carry one token through every layer; the cache of layers from the stage on holds only survivors."
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)) as ctx:
        seen, hs = lengths(fx.model)
        try: out = fx.model.generate(**fx.x, **fx.gen, return_dict_in_generate=True)
        finally:
            for h in hs: h.remove()
        S = max(k.numel() for k in ctx.inside.kept[0])
    assert all(v[1:] == [1] * 4 for v in seen.values())
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    L = fx.x["input_ids"].shape[1]
    assert cache.get_seq_length(0) == L + 4 and cache.get_seq_length(K) == S + 4


def test_beams_and_sampling_run(fx):
    g = dict(fx.gen); g.pop("do_sample")
    try:
        with pruned(fx.model, None): fx.model.generate(**fx.x, **g, num_beams=2, do_sample=False)
    except AttributeError as e:                # the family's pre-LLM path itself (InternVL's feature list under beams)
        pytest.skip(f"beam search fails without in-LLM stages on {fx.f.name}: {e}")
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
        a = fx.model.generate(**fx.x, **g, num_beams=2, do_sample=False)
        b = fx.model.generate(**fx.x, **g, num_beams=2, do_sample=False, use_cache=False)
        torch.manual_seed(0); s = fx.model.generate(**fx.x, **g, do_sample=True, num_return_sequences=2)
    assert torch.equal(a, b) and s.shape[0] == 6


def test_composes_with_pre_llm_policy(fx):
    with pruned(fx.model, RandomPrune(keep=0.5), inside=FastV(layer=K, keep=0.5)) as ctx:
        seen, hs = lengths(fx.model)
        try: fx.model(**fx.x)
        finally:
            for h in hs: h.remove()
        short = ctx.last.kwargs["input_ids"]
        kept = ctx.inside.kept[0]
    assert seen[0] == [short.shape[1]] and seen[K] == [max(k.numel() for k in kept)] < [short.shape[1]]


# ---- restoration -------------------------------------------------------------------------------------------------
def test_model_unchanged_after_exit_and_exception(fx):
    before = state(fx.model); ref = fx.model(**fx.x).logits
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
        fx.model(**fx.x)
    assert state(fx.model) == before and torch.equal(fx.model(**fx.x).logits, ref)
    with pytest.raises(KeyError):
        with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
            fx.model.generate(**fx.x, **fx.gen); raise KeyError("boom")
    assert state(fx.model) == before and torch.equal(fx.model(**fx.x).logits, ref)
    with pytest.raises(ValueError, match="layer"):          # a stage past the last layer: refused before anything is set
        with pruned(fx.model, None, inside=FastV(layer=4, keep=0.5)): pass
    assert state(fx.model) == before


# ---- arguments -------------------------------------------------------------------------------------------------
def test_arguments():
    assert eval(repr(FastV(layer=3, keep=0.25))) == FastV(layer=3, keep=0.25)
    for bad, exc in ((dict(layer=0), ValueError), (dict(keep=0.0), ValueError), (dict(keep=True), TypeError),
                     (dict(layer=2.0), TypeError)):
        with pytest.raises(exc): FastV(**bad)
    with pytest.raises(ValueError, match="increasing"): check_stages([Stage(2, 0.5), Stage(2, 0.5)], 4)
    with pytest.raises(TypeError, match="inside"):
        with pruned(FAMS[0].tiny(0)[0], None, inside=FastV): pass


def test_eager_kernel_generate(fx):
    "The eager kernel gets float additive masks: batched == alone, cache == no cache."
    model, _ = build(fx.f, attn_implementation="eager")
    with pruned(model, None, inside=FastV(layer=K, keep=0.5)):
        out = model.generate(**fx.x, **fx.gen)
        assert torch.equal(out, model.generate(**fx.x, **fx.gen, use_cache=False))
        for i, xi in enumerate(fx.alone):
            assert torch.equal(out[i, -5:], model.generate(**xi, **fx.gen)[0, -5:]), i


def test_deepcopy_inside_is_an_ordinary_model(fx):
    import copy
    ref = fx.model(**fx.x).logits
    with pruned(fx.model, None, inside=FastV(layer=K, keep=0.5)):
        fx.model(**fx.x)                                            # the runner holds this call's state
        twin = copy.deepcopy(fx.model)
        assert torch.equal(twin(**fx.x).logits, ref)


def test_refused_where_not_supported():
    fams = families()
    q35 = [f for f in fams.values() if f.name == "qwen3.5"]
    if q35:
        model, _ = q35[0].tiny(0)
        before = state(model)
        with pytest.raises(ValueError, match="full-attention"):
            with pruned(model, None, inside=DART(layer=1, keep=0.5)): pass
        assert state(model) == before
    q3 = [f for f in fams.values() if f.name == "qwen3-vl"]
    if q3:
        model, _ = q3[0].tiny(0)
        before = state(model)
        with pytest.raises(ValueError, match="DeepStack"):
            with pruned(model, None, inside=FastV(layer=1, keep=0.5)): pass
        assert state(model) == before
    f = FAMS[0]
    model, proc = build(f)
    x = dict(f.inputs(proc, PROMPTS[:1], sizes=SIZES[:1]))
    with pruned(model, None, inside=FastV(layer=K, keep=0.5)):
        with pytest.raises(ValueError, match="labels"): model(**x, labels=x["input_ids"])


# ---- the four methods, every supported family --------------------------------------------------------------------
def _counts(policy, n_img:int)->list:
    "Image tokens of one sample after each stage: chained `Stage.count`, plus the tokens a stage recycles (SparseVLM)."
    out = []
    for st in policy.stages(N_LAYERS):
        c = st.count(n_img); n_img = c + policy.recycled(n_img - c); out.append(n_img)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_method_keep_all_is_bit_exact(fx, method):
    ref = fx.model(**fx.x).logits
    ref_g = fx.model.generate(**fx.x, **fx.gen)
    with pruned(fx.model, None, inside=METHODS[method][1]) as ctx:
        assert torch.equal(fx.model(**fx.x).logits, ref)
        assert torch.equal(fx.model.generate(**fx.x, **fx.gen), ref_g)
        assert all(k is not None for k in ctx.inside.kept)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_layers_see_exactly_the_survivors(fx, method):
    policy = METHODS[method][0]
    ids, am = fx.x["input_ids"], fx.x["attention_mask"].bool()
    with pruned(fx.model, None, inside=policy) as ctx:
        seen, hs = lengths(fx.model)
        try: out = fx.model(**fx.x)
        finally:
            for h in hs: h.remove()
        kept = ctx.inside.kept
    stages = policy.stages(N_LAYERS)
    n_img = ((ids == fx.img) & am).sum(1); n_txt = (am & (ids != fx.img)).sum(1)
    want = [[int(t) + c for c in _counts(policy, int(n))] for t, n in zip(n_txt, n_img)]    # [sample][stage]
    assert len(kept) == len(stages)
    assert [[t + c for c in policy.image_counts(int(n), N_LAYERS)] for t, n in zip(n_txt.tolist(), n_img)] == want
    for s in range(len(stages)):
        assert [k.numel() for k in kept[s]] == [w[s] for w in want]
        for b, k in enumerate(kept[s]):
            assert am[b, k].all() and int((ids[b, k] != fx.img).sum()) == int(n_txt[b])   # text never pruned
            if s: assert torch.isin(k, kept[s - 1][b]).all()     # survivors of survivors (a recycled token sits at a
                                                                 # dropped token's column: one present before the stage)
    for l in range(N_LAYERS):
        done = [s for s, st in enumerate(stages) if st.layer <= l]
        expect = ids.shape[1] if not done else max(w[done[-1]] for w in want)
        assert seen[l] == [expect], (l, seen[l], expect)
    assert out.logits.shape[1] == max(w[-1] for w in want)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_generate_batched_alone_and_cache(fx, method):
    policy = METHODS[method][0]
    with pruned(fx.model, None, inside=policy):
        out = fx.model.generate(**fx.x, **fx.gen)
        assert torch.equal(out, fx.model.generate(**fx.x, **fx.gen, use_cache=False))
        for i, xi in enumerate(fx.alone):
            assert torch.equal(out[i, -5:], fx.model.generate(**xi, **fx.gen)[0, -5:]), i


@pytest.mark.parametrize("method", list(METHODS))
def test_method_model_unchanged_after_exit_and_exception(fx, method):
    policy = METHODS[method][0]
    before = state(fx.model); ref = fx.model(**fx.x).logits
    with pruned(fx.model, None, inside=policy):
        fx.model(**fx.x)
    assert state(fx.model) == before and torch.equal(fx.model(**fx.x).logits, ref)
    with pytest.raises(KeyError):
        with pruned(fx.model, None, inside=policy):
            fx.model.generate(**fx.x, **fx.gen); raise KeyError("boom")
    assert state(fx.model) == before and torch.equal(fx.model(**fx.x).logits, ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_composes_with_pre_llm_policy(fx, method):
    policy = METHODS[method][0]
    with pruned(fx.model, RandomPrune(keep=0.5), inside=policy) as ctx:
        seen, hs = lengths(fx.model)
        try: fx.model(**fx.x)
        finally:
            for h in hs: h.remove()
        short, sam = ctx.last.kwargs["input_ids"], ctx.last.kwargs["attention_mask"].bool()
        kept = ctx.inside.kept
    n_img = ((short == fx.img) & sam).sum(1); n_txt = (sam & (short != fx.img)).sum(1)
    want = [int(t) + _counts(policy, int(n))[-1] for t, n in zip(n_txt, n_img)]
    assert [k.numel() for k in kept[-1]] == want
    assert seen[0] == [short.shape[1]] and seen[N_LAYERS - 1] == [max(want)] < [short.shape[1]]


# ---- names and budgets -------------------------------------------------------------------------------------------
def test_methods_by_name_and_arguments():
    assert set(INSIDE) == {"fastv", "pdrop", "sparsevlm", "dart"}
    for name, (p, full) in METHODS.items():
        assert isinstance(p, INSIDE[name]) and eval(repr(p)) == p and eval(repr(full)) == full
    for cls, bad, exc in ((PyramidDrop, dict(ratio=0), ValueError), (PyramidDrop, dict(layers=(3, 1)), ValueError),
                          (PyramidDrop, dict(layers=2), TypeError), (SparseVLM, dict(keep=(0.2, 0.4)), ValueError),
                          (SparseVLM, dict(keep=0.5), TypeError), (SparseVLM, dict(keep=(0.5,), layers=(1, 2)), ValueError),
                          (DART, dict(layer=0), ValueError), (DART, dict(image_pivots=0), ValueError),
                          (DART, dict(text_pivots=1.5), TypeError), (DART, dict(keep=2), ValueError)):
        with pytest.raises(exc, match=next(iter(bad))): cls(**bad)
    with pytest.raises(ValueError, match="layers"):          # defaults too deep for the toy LLaVA's 3-layer LM
        PyramidDrop().stages(3)
    with pytest.raises(ValueError, match="layers"): SparseVLM().stages(3)
    assert [s.layer for s in PyramidDrop(layers=(1, 2)).stages(3)] == [1, 2]
    assert [s.layer for s in SparseVLM(keep=(0.5, 0.25), layers=(0, 1)).stages(3)] == [1, 2]


@pytest.mark.parametrize("name", list(INSIDE))
@pytest.mark.parametrize("keep,n_layers", [(0.5, 32), (0.25, 28), (0.6, 4)])
def test_equal_flops_matches_the_pre_llm_share(name, keep, n_layers):
    kw = dict(layers=(1, 4, 8)) if name == "pdrop" and n_layers != 4 else {}
    p = equal_flops(name, keep, n_layers, **kw)
    assert isinstance(p, INSIDE[name]) and math.isclose(image_share(p, n_layers), keep, rel_tol=1e-6)


def test_equal_flops_refuses_what_a_method_cannot_reach():
    with pytest.raises(ValueError, match="keep"): equal_flops("fastv", 2 / 32, 32)     # 2 full layers of 32 = 0.0625
    with pytest.raises(ValueError, match="keep"): equal_flops("pdrop", 0.2, 32)        # 8 full layers of 32 = 0.25
    with pytest.raises(ValueError, match="name"): equal_flops("tome", 0.5, 32)
    with pytest.raises(ValueError, match="ratio"): equal_flops("pdrop", 0.5, 32, ratio=0.3)
    with pytest.raises(ValueError, match="schedule"): equal_flops("fastv", 0.5, 32, schedule=(0.5,))


def test_equal_flops_runs_on_the_toy_depth():
    "The toy LLaVA's LM has 3 layers: stage layer 1 (FastV/DART), PyramidDrop/SparseVLM with explicit layers."
    for name, kw in (("fastv", dict(layer=1)), ("dart", dict(layer=1)), ("pdrop", dict(layers=(1, 2))),
                     ("sparsevlm", dict(layers=(0, 1)))):
        p = equal_flops(name, 0.5, 3, **kw)
        assert math.isclose(image_share(p, 3), 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("make", [lambda: FastV(layer=2, keep=0.5), lambda: DART(layer=2, keep=0.3),
                                  lambda: SparseVLM(keep=(0.5, 0.25), layers=(0, 1))], ids=["fastv", "dart", "sparsevlm"])
def test_scorer_before_its_stage_reuses_the_layers_own_projections(make, monkeypatch):
    """A scorer layer that runs on the layout its stage prunes is scored from the q/k its own forward computes
    (REUSE_PROJECTIONS): the same logits and generations as projecting again, at a fraction of the scoring FLOPs."""
    from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs
    from tokprune_nb.inllm import base as IB
    model, proc = tiny_llava(text_layers=4)
    x = tiny_inputs(proc, ["what is in the image ?", "how many dog are there ?"])
    res, cached, real = {}, [], IB.cached_keys
    monkeypatch.setattr(IB, "cached_keys", lambda *a: cached.append(real(*a)) or cached[-1])
    for reuse in (False, True):
        monkeypatch.setattr(IB, "REUSE_PROJECTIONS", reuse)
        with torch.no_grad(), pruned(model, None, inside=make()):
            t0 = IB.SCORING["flops"]; logits = model(**x).logits; fl = IB.SCORING["flops"] - t0
            gen = model.generate(**x, max_new_tokens=4, do_sample=False)
            no_cache = model(**x, use_cache=False).logits     # no cache to read the rotated keys from: rotate again
        res[reuse] = (logits, fl, gen, no_cache)
    assert torch.equal(res[False][0], res[True][0]) and torch.equal(res[False][2], res[True][2])
    assert torch.equal(res[True][3], res[True][0]) and torch.equal(res[False][3], res[True][0])
    assert res[True][1] * 4 <= res[False][1]
    # with a cache the scorer reads the keys its layer cached (no rotary embedding redone); without one it cannot
    assert any(k is not None for k in cached) and any(k is None for k in cached)


def test_timed_scoring_includes_the_recycling(fx):
    "`tokprune bench` times every scoring call of an in-LLM policy: SparseVLM's recycling pool and DPC-kNN clusters too."
    from collections import Counter
    from tokprune_nb.measure.bench import TimedInside
    tp, calls = TimedInside(SparseVLM(keep=(0.5, 0.25, 0.125))), Counter()
    for name in ("select", "prepare", "recycle", "clusters"):
        def spy(*a, _f=getattr(tp.policy, name), _n=name, **kw): calls[_n] += 1; return _f(*a, **kw)
        setattr(tp.policy, name, spy)
    with pruned(fx.model, None, inside=tp.policy): fx.model(**fx.x)
    assert calls["clusters"] > 0 and calls["recycle"] == calls["select"] == 3
    assert len(tp.times) == sum(calls.values())          # each call timed once


def test_sparsevlm_recycles_dropped_tokens_as_their_cluster_means(fx):
    """SparseVLM's token recycling, every supported family: the pool is each sample's best-rated ⌊0.3·d⌋ + 1 dropped
    image tokens; each cluster becomes one token at its centre's column holding the cluster's mean hidden state (as it
    leaves the scoring layer); without recycling the same stage keeps only the survivors."""
    from tokprune_nb.inllm.sparsevlm import recycle_sizes
    lm = text_model(fx.model)
    def grab(d):
        def hook(m, a, kw): d.setdefault("h", a[0] if a else kw["hidden_states"])
        return hook
    before, after = {}, {}
    h1 = lm.layers[1].register_forward_pre_hook(grab(before), with_kwargs=True)     # runs before the stage
    try:
        with pruned(fx.model, None, inside=SparseVLM(keep=(0.5, 0.25, 0.125))) as ctx:
            h2 = lm.layers[1].register_forward_pre_hook(grab(after), with_kwargs=True)   # after it
            try: fx.model(**fx.x)
            finally: h2.remove()
            lay, pool, kept = ctx.inside.state["layouts"][0], ctx.inside.state["pool"][0], ctx.inside.kept[0]
        with pruned(fx.model, None, inside=SparseVLM(keep=(0.5, 0.25, 0.125), recycle=False)) as ctx:
            fx.model(**fx.x)
            plain = ctx.inside.kept[0]
    finally: h1.remove()
    ids, am = fx.x["input_ids"], fx.x["attention_mask"].bool()
    for b in range(ids.shape[0]):
        n = int(((ids[b] == fx.img) & am[b]).sum()); d = n - Stage(1, 0.5).count(n)
        m, R = recycle_sizes(d)
        slots, src, cid = lay.mix[b]
        assert torch.equal(src, pool[b]) and src.numel() == m and slots.numel() == R and cid.max() == R - 1
        assert not torch.isin(src, plain[b]).any() and (ids[b, src] == fx.img).all()    # dropped image tokens only
        assert kept[b].numel() == plain[b].numel() + R and torch.isin(plain[b], kept[b]).all()
        for r in range(R):
            torch.testing.assert_close(after["h"][b, slots[r]], before["h"][b, src[cid == r]].mean(0), atol=1e-5, rtol=1e-4)


def test_scoring_runs_in_inference_mode_and_leaves_ordinary_tensors(fx):
    """Every scoring step (`prepare`, `select`, `recycle`, `clusters`) runs under `torch.inference_mode()`; what the
    runner keeps from it is ordinary, so a forward with autograd on (fine-tuning through a pruned model) still
    back-propagates."""
    pol = SparseVLM(keep=(0.5, 0.25, 0.125))
    seen = {}
    for name in ("prepare", "select", "recycle", "clusters"):
        fn = getattr(pol, name)
        def probe(*a, _fn=fn, _name=name):
            seen.setdefault(_name, []).append(torch.is_inference_mode_enabled()); return _fn(*a)
        setattr(pol, name, probe)
    with pruned(fx.model, None, inside=pol) as ctx:
        fx.model(**fx.x)
        assert set(seen) == {"prepare", "select", "recycle", "clusters"} and all(all(v) for v in seen.values()), seen
        for stage in ctx.inside.kept:
            assert all(not k.is_inference() for k in stage)
        with torch.enable_grad():
            emb = fx.model.get_input_embeddings()
            emb.weight.requires_grad_(True)
            try:
                fx.model(**fx.x).logits.float().square().mean().backward()
                assert emb.weight.grad is not None and bool(torch.isfinite(emb.weight.grad).all())
            finally:
                emb.weight.requires_grad_(False); emb.weight.grad = None

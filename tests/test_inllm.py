"""In-LLM pruning (tokprune_nb.inllm): the shared mechanism and FastV, on every registered family it supports.

Tiny random models with 4 decoder layers; the stage is at layer 2 (FastV scores with layer 1's own q/k)."""
from types import SimpleNamespace
import math
import pytest
import torch
import tokprune_nb.inllm.base as inllm_base
from tokprune_nb.registry import families
from tokprune_nb.inject import pruned
from tokprune_nb.inllm.base import InsideRunner, Stage, check_stages, text_model
from tokprune_nb.inllm.fastv import FastV
from tokprune_nb.policies import RandomPrune

torch.set_grad_enabled(False)
LAYERS = {"llava": dict(text_layers=4), "qwen2.5-vl": dict(layers=4), "qwen2-vl": dict(layers=4)}    # families the in-LLM stages support
FAMS = [f for f in families().values() if f.name in LAYERS]
PROMPTS = ["what is in the image ?", "how many dog are there on the left ?", "describe the image"]
SIZES = [(56, 56), (28, 84), (112, 112)]                                 # Qwen: different image-token counts per row
K = 2


@pytest.fixture(scope="module", params=FAMS, ids=lambda f: f.name)
def fx(request):
    f = request.param
    model, proc = f.tiny(0, **LAYERS[f.name])
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
    model, _ = fx.f.tiny(0, attn_implementation="eager", **LAYERS[fx.f.name])
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
    model, _ = fx.f.tiny(0, attn_implementation="eager", **LAYERS[fx.f.name])
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
    q3 = [f for f in fams.values() if f.name == "qwen3-vl"]
    if q3:
        model, _ = q3[0].tiny(0)
        before = state(model)
        with pytest.raises(ValueError, match="DeepStack"):
            with pruned(model, None, inside=FastV(layer=1, keep=0.5)): pass
        assert state(model) == before
    f = FAMS[0]
    model, proc = f.tiny(0, **LAYERS[f.name])
    x = dict(f.inputs(proc, PROMPTS[:1], sizes=SIZES[:1]))
    with pruned(model, None, inside=FastV(layer=K, keep=0.5)):
        with pytest.raises(ValueError, match="labels"): model(**x, labels=x["input_ids"])

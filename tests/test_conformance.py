"""The adapter conformance suite: every registered model family must pass every test here, unchanged.

Parametrized over `registry.families()` (timm's `tests/test_models.py` is the model): a new family passes it by
registering its adapter, its tiny model builder and its input builder. Nothing here knows a family by name."""
import copy
from types import SimpleNamespace
import pytest
import torch
from tokprune_nb.registry import families
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.policies import POLICIES, RandomPrune, RelevancePrune, UniformPrune, ClsAttnPrune, ZSPAPrune
from tokprune_nb.testing.tiny import tiny_clip

FAMS = list(families().values())
PROMPTS = ["what is in the image ?", "how many dog are there on the left ?", "describe the image"]
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module", params=FAMS, ids=lambda f: f.name)
def fx(request):
    f = request.param
    model, proc = f.tiny(0)
    return SimpleNamespace(f=f, model=model, proc=proc)


def scenario(fx, name, seed=0):
    "Processor outputs for one named batch layout."
    build = fx.f.inputs
    if name == "b1": return dict(build(fx.proc, PROMPTS[:1], sizes=[(56, 56)], seed=seed))
    if name == "b3": return dict(build(fx.proc, PROMPTS, sizes=[(56, 56)] * 3, seed=seed))
    if name == "mixed": return dict(build(fx.proc, PROMPTS, sizes=[(56, 56), (28, 84), (112, 112)], seed=seed))
    if name == "two_images":
        if not fx.f.multi_image: pytest.skip(f"{fx.f.class_name} takes one image per sample")
        return dict(build(fx.proc, PROMPTS[:2], sizes=[(56, 56)] * 3, n_images=[2, 1], seed=seed))
    if name == "image_only": return dict(build(fx.proc, ["", PROMPTS[1]], sizes=[(56, 56)] * 2, seed=seed))
    if name == "right":
        tok = fx.proc.tokenizer; side = tok.padding_side; tok.padding_side = "right"
        try: return dict(build(fx.proc, PROMPTS, sizes=[(56, 56)] * 3, seed=seed))
        finally: tok.padding_side = side
    raise KeyError(name)


def image_id(fx): return fx.model.config.image_token_id


def lm_inputs(fx, fn):
    "Run `fn()`; return the kwargs the inner multimodal model received on its first call (shortened ids, features)."
    import inspect
    got, sig = [], inspect.signature(fx.model.model.forward)
    h = fx.model.model.register_forward_pre_hook(lambda m, a, kw: got.append(dict(sig.bind(*a, **kw).arguments)),
                                                 with_kwargs=True)
    try:
        with torch.no_grad(): fn()
    finally: h.remove()
    return got


def module(model, path):
    for p in path.split("."): model = getattr(model, p)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, set(model.__dict__)


def assert_unchanged(model, snap):
    sd, keys = snap
    assert set(model.__dict__) == keys
    for k, v in model.state_dict().items(): assert torch.equal(v, sd[k]), k


# ---- keep everything: bit-exact ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["b1", "b3", "right", "mixed", "two_images", "image_only"])
def test_keep_all_is_bit_exact(fx, name):
    x = scenario(fx, name)
    with torch.no_grad():
        ref = fx.model(**x).logits
        gref = fx.model.generate(**x, **GEN) if name != "right" else None
        for policy in (RandomPrune(keep=1.0), UniformPrune(keep=1.0)):
            with pruned(fx.model, policy):
                assert torch.equal(fx.model(**x).logits, ref)
                if gref is not None: assert torch.equal(fx.model.generate(**x, **GEN), gref)


def test_keep_n_tokens_is_bit_exact(fx):
    "keep=N (an int: every prunable token of the image) is the unpruned model too."
    x = scenario(fx, "b1")
    with torch.no_grad():
        ref, gref = fx.model(**x).logits, fx.model.generate(**x, **GEN)
        with pruned(fx.model, RandomPrune(keep=1.0)): fx.model(**x)
        n = len(last_selection(fx.model)[0])                      # prunable tokens (LLaVA-NeXT: newlines excluded)
        with pruned(fx.model, RandomPrune(keep=n)):
            assert torch.equal(fx.model(**x).logits, ref)
            assert torch.equal(fx.model.generate(**x, **GEN), gref)


# ---- keep < 1: the LM sees exactly the kept image tokens, text untouched, no padding left ------------------------
@pytest.mark.parametrize("name", ["b3", "right", "mixed", "two_images", "image_only"])
def test_lm_sees_exactly_the_kept_tokens(fx, name):
    x = scenario(fx, name)
    ids, am = x["input_ids"], x.get("attention_mask")
    am = torch.ones_like(ids) if am is None else am
    policy = RandomPrune(keep=0.25, seed=3)
    with pruned(fx.model, policy) as ctx:
        got = lm_inputs(fx, lambda: fx.model(**x))
    kw = got[0]
    kw.update(kw.pop("kwargs", None) or {})
    sids, sam = kw["input_ids"], kw.get("attention_mask")
    sam = torch.ones_like(sids) if sam is None else sam
    feats = kw["mm_encoder_outputs"]["image"].pooler_output
    sel = ctx.selection
    for f, s in zip(feats, sel):
        assert f.shape[0] >= len(s) and (f.shape[0] == len(s) or getattr(ctx.adapter, "structural_tokens", False))
    img = image_id(fx)
    real = [int(sam[b].sum()) for b in range(sids.shape[0])]
    assert sids.shape[1] == max(real), "padding left after pruning: LM width must equal the longest real row"
    assert int((sids == img).sum()) == sum(f.shape[0] for f in feats)
    for b in range(ids.shape[0]):
        orig_text = ids[b][(ids[b] != img) & am[b].bool()]
        new_text = sids[b][(sids[b] != img) & sam[b].bool()]
        assert torch.equal(orig_text, new_text), "text tokens must never be pruned or reordered"


def test_each_image_gets_its_budget(fx):
    x = scenario(fx, "mixed")
    with pruned(fx.model, RandomPrune(keep=1.0)), torch.no_grad(): fx.model(**x)
    counts = [len(s) for s in last_selection(fx.model)]
    with pruned(fx.model, RandomPrune(keep=0.25)), torch.no_grad(): fx.model(**x)
    assert [len(s) for s in last_selection(fx.model)] == [RandomPrune(keep=0.25).budget(n) for n in counts]


# ---- per-sample selection ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["b3", "mixed"])
def test_each_sample_selects_by_its_own_prompt(fx, name):
    x = scenario(fx, name)
    policy = RelevancePrune(keep=0.5)
    with pruned(fx.model, policy), torch.no_grad():
        fx.model(**x); batch = last_selection(fx.model)
        n_img = x["input_ids"].shape[0]
        singles = []
        for i in range(n_img):
            sizes = [[(56, 56)] * 3, [(56, 56), (28, 84), (112, 112)]][name == "mixed"]
            xi = dict(fx.f.inputs(fx.proc, [PROMPTS[i]], sizes=sizes[i:i+1], seed=i))      # the same image as in the batch
            fx.model(**xi); singles += last_selection(fx.model)
    for b, s in zip(batch, singles): assert torch.equal(b, s)


def test_batched_logits_match_single(fx):
    x = scenario(fx, "b3")
    with pruned(fx.model, RelevancePrune(keep=0.5)), torch.no_grad():
        lb = fx.model(**x).logits[:, -1]
        for i in range(3):
            xi = dict(fx.f.inputs(fx.proc, [PROMPTS[i]], sizes=[(56, 56)], seed=i))
            torch.testing.assert_close(fx.model(**xi).logits[0, -1], lb[i], atol=1e-5, rtol=1e-4)


def test_generate_with_cache_keeps_prompt_and_length(fx):
    x = scenario(fx, "b3")
    # a random model may emit an image placeholder, which a cache-free re-run would read as an image token
    no_specials = dict(suppress_tokens=list(fx.f.adapter(fx.model).special_token_ids()))
    with pruned(fx.model, RelevancePrune(keep=0.25)), torch.no_grad():
        out = fx.model.generate(**x, **GEN, **no_specials)
        nocache = fx.model.generate(**x, **GEN, **no_specials, use_cache=False)
    L = x["input_ids"].shape[1]
    assert out.shape == (3, L + 4) and torch.equal(out[:, :L], x["input_ids"])
    assert torch.equal(out, nocache)


# ---- one vision pass; every policy the family can serve --------------------------------------------------------
@pytest.mark.parametrize("how", ["forward", "generate"])
def test_vision_tower_runs_once(fx, how):
    x = scenario(fx, "b3")
    tower = module(fx.model, fx.f.flop_parts["vision"][0][0])
    calls = []
    h = tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pruned(fx.model, ClsAttnPrune(keep=0.5)), torch.no_grad():
            fx.model(**x) if how == "forward" else fx.model.generate(**x, **GEN)
    finally: h.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("pname", sorted(POLICIES))
def test_every_policy_runs(fx, pname):
    x = scenario(fx, "mixed")
    policy = POLICIES[pname](keep=0.5)
    kw = {}
    if fx.f.clip_tower:
        clip, ctok = tiny_clip(fx.model)
        kw = dict(clip=clip, clip_tokenizer=ctok, tokenizer=fx.proc.tokenizer)
    needs_clip = bool(set(getattr(policy, "needs", ())) & {"clip_feats", "clip_text"})
    if needs_clip and not fx.f.clip_tower:
        with pytest.raises(ValueError, match="vision tower is not a CLIP model"):   # the template's refusal, any family
            with pruned(fx.model, policy, **kw): pass
        return
    with pruned(fx.model, policy, **kw), torch.no_grad(): out = fx.model(**x)
    assert torch.isfinite(out.logits).all()
    with pruned(fx.model, RandomPrune(keep=1.0)), torch.no_grad(): fx.model(**x)
    counts = [len(s) for s in last_selection(fx.model)]
    with pruned(fx.model, policy, **kw), torch.no_grad(): fx.model(**x)
    assert [len(s) for s in last_selection(fx.model)] == [policy.budget(n) for n in counts]


def test_image_only_sample(fx):
    """Prompt-free policies run on a batch with an image-only sample; prompt-aware ones raise the documented error when the
    sample has no text at all (a chat template that wraps the image in text gives it a prompt: then they run)."""
    from tokprune_nb.adapters.base import text_token_mask
    x = scenario(fx, "image_only")
    with pruned(fx.model, RandomPrune(keep=0.5)), torch.no_grad(): fx.model(**x)
    has_text = bool(text_token_mask(x["input_ids"], x.get("attention_mask"), fx.f.adapter(fx.model).special_token_ids())[0].any())
    with pruned(fx.model, ZSPAPrune(keep=0.5)), torch.no_grad():
        if has_text: fx.model(**x)
        else:
            with pytest.raises(ValueError, match=r"sample\(s\) \[0\] have no text besides image tokens"): fx.model(**x)


# ---- the model is unchanged ------------------------------------------------------------------------------------------
def test_model_unchanged_after_exit_exception_and_deepcopy(fx):
    x = scenario(fx, "b3")
    snap = snapshot(fx.model)
    with torch.no_grad(): ref = fx.model(**x).logits
    with pruned(fx.model, RelevancePrune(keep=0.25)), torch.no_grad(): fx.model(**x)
    assert_unchanged(fx.model, snap)
    with pytest.raises(KeyError):
        with pruned(fx.model, RelevancePrune(keep=0.25)): raise KeyError("boom")
    assert_unchanged(fx.model, snap)
    with pruned(fx.model, RelevancePrune(keep=0.25)):
        twin = copy.deepcopy(fx.model)
    assert_unchanged(fx.model, snap)
    with torch.no_grad():
        assert torch.equal(fx.model(**x).logits, ref)
        assert torch.equal(twin(**x).logits, ref)                     # an ordinary, unpruned copy
        for p in twin.parameters(): p.zero_()
        assert not torch.equal(twin(**x).logits, ref)                 # ... that runs its own weights
        assert torch.equal(fx.model(**x).logits, ref)


def test_gradients_reach_the_vision_tower(fx):
    x = scenario(fx, "b3")
    tower = module(fx.model, fx.f.flop_parts["vision"][0][0])
    def grads(ctx):
        fx.model.zero_grad(set_to_none=True)
        with torch.enable_grad(), ctx: fx.model(**x).logits.float().pow(2).mean().backward()
        return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower.parameters()]
    import contextlib
    outside = grads(contextlib.nullcontext())
    inside = grads(pruned(fx.model, RelevancePrune(keep=0.5)))
    fx.model.zero_grad(set_to_none=True)
    assert any(outside)
    assert inside == outside


def test_policy_class_instead_of_instance(fx):
    with pytest.raises(TypeError, match="must be a policy instance"):
        with pruned(fx.model, ZSPAPrune): pass


def test_nan_pixels_are_named(fx):
    x = scenario(fx, "b1")
    key = fx.f.adapter.image_keys[0]
    x[key] = x[key].clone(); x[key].view(-1)[0] = float("nan")
    with pruned(fx.model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match=f"`{key}` contains NaN"):
        fx.model(**x)


def test_generation_config_max_length_no_extra_kwarg(fx, recwarn):
    x = scenario(fx, "b1")
    gc = copy.deepcopy(fx.model.generation_config)
    gc.max_length = gc.min_length = x["input_ids"].shape[1] + 3; gc.do_sample = False   # min_length: no early stop
    with torch.no_grad():
        ref = fx.model.generate(**x, generation_config=gc)
        with pruned(fx.model, RandomPrune(keep=1.0)):
            assert torch.equal(fx.model.generate(**x, generation_config=gc), ref)
        with pruned(fx.model, RandomPrune(keep=0.25)):
            out = fx.model.generate(**x, generation_config=gc)
    assert out.shape[1] == ref.shape[1]                                  # same number of new tokens
    assert gc.max_length == x["input_ids"].shape[1] + 3                  # the user's config is not modified
    assert not [w for w in recwarn.list if "max_length" in str(w.message)]


# ---- merging policies: VisionZip and merge-back of a selection policy, on every family ------------------------------
from tokprune_nb.merging import VisionZip, ToMePrune
from tokprune_nb.policies import DivPrune

MERGERS = {"visionzip": lambda keep: VisionZip(keep), "divprune+merge": lambda keep: DivPrune(keep, merge_pruned=True),
           "tome": lambda keep: ToMePrune(keep)}


def image_features(fx, policy, x):
    "Per image (or tile group) features the LM receives under `policy`, and the context's selection."
    with pruned(fx.model, policy) as ctx:
        got = lm_inputs(fx, lambda: fx.model(**x))
    kw = got[0]; kw.update(kw.pop("kwargs", None) or {})
    return list(kw["mm_encoder_outputs"]["image"].pooler_output), kw["input_ids"], ctx.selection


@pytest.mark.parametrize("mname", sorted(MERGERS))
@pytest.mark.parametrize("name", ["b3", "mixed"])
def test_merging_keep_all_is_bit_exact(fx, mname, name):
    x = scenario(fx, name)
    with torch.no_grad():
        ref, gref = fx.model(**x).logits, fx.model.generate(**x, **GEN)
        with pruned(fx.model, MERGERS[mname](1.0)):
            assert torch.equal(fx.model(**x).logits, ref)
            assert torch.equal(fx.model.generate(**x, **GEN), gref)


@pytest.mark.parametrize("mname", sorted(MERGERS))
def test_merging_lm_gets_k_tokens_and_merged_ones_are_new(fx, mname):
    """At keep < 1 the LM receives exactly k image tokens per image (plus LLaVA-NeXT-style layout tokens); each is
    either an original token, bit for bit, or a merged one that differs from every original token of its image."""
    x = scenario(fx, "mixed")
    full, _, full_sel = image_features(fx, RandomPrune(keep=1.0), x)
    policy = MERGERS[mname](0.25)
    feats, sids, sel = image_features(fx, policy, x)
    assert [len(s) for s in sel] == [policy.budget(len(s)) for s in full_sel]
    structural = getattr(fx.f.adapter, "structural_tokens", False)
    assert int((sids == image_id(fx)).sum()) == sum(f.shape[0] for f in feats)
    merged_images = 0
    for f, s, orig, all_ in zip(feats, sel, full, full_sel):
        assert f.shape[0] == len(s) or (structural and f.shape[0] > len(s))
        same = [any(torch.equal(row, o) for o in orig) for row in f]
        new = [row for row, eq in zip(f, same) if not eq]
        n, k = len(all_), len(s)      # VisionZip merges only when its split has a contextual token
        merges = k < n and (not hasattr(policy, "split") or policy.split(k)[1] >= 1)
        assert (len(new) >= 1) == merges, "a kept token stands for merged ones exactly when something is merged"
        merged_images += merges
        for row in new:                                                   # a merged token is none of the originals
            assert torch.isfinite(row).all()
            assert not any(torch.allclose(row, o, atol=1e-6, rtol=0) for o in orig)
    assert merged_images >= 1


@pytest.mark.parametrize("mname", sorted(MERGERS))
def test_merging_batch_equals_single(fx, mname):
    x = scenario(fx, "b3")
    policy = MERGERS[mname](0.5)
    with pruned(fx.model, policy), torch.no_grad():
        lb = fx.model(**x).logits[:, -1]; batch = last_selection(fx.model)
        for i in range(3):
            xi = dict(fx.f.inputs(fx.proc, [PROMPTS[i]], sizes=[(56, 56)], seed=i))
            li = fx.model(**xi).logits[0, -1]
            assert torch.equal(last_selection(fx.model)[0], batch[i])
            torch.testing.assert_close(li, lb[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mname", sorted(MERGERS))
def test_merging_model_unchanged_after_exit(fx, mname):
    x = scenario(fx, "b3")
    snap = snapshot(fx.model)
    with torch.no_grad(): ref = fx.model(**x).logits
    with pruned(fx.model, MERGERS[mname](0.25)), torch.no_grad(): out = fx.model(**x).logits
    assert out.shape[:1] == ref.shape[:1] and not torch.equal(out[:, -1], ref[:, -1])
    assert_unchanged(fx.model, snap)
    with torch.no_grad(): assert torch.equal(fx.model(**x).logits, ref)

"""Qwen2-VL and Qwen3-VL specifics beyond the conformance suite: DeepStack consistency (every level gets exactly the
kept tokens), kept tokens keep their unpruned 3D positions (forward, prefill and decoding), saliency from a
full-attention tower, published geometry, bad inputs."""
import pytest
import torch
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.policies import RandomPrune, ClsAttnPrune, RelevancePrune, ZSPAPrune
from tokprune_nb.registry import family_named
from tokprune_nb.testing.tiny import tiny_qwen_inputs, tiny_images
from tokprune_nb.testing.tiny_qwen_vl import tiny_qwen2_vl, tiny_qwen3_vl
from tokprune_nb.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokprune_nb.adapters.qwen2_vl import Qwen2VLAdapter, full_attention_tokens, full_attention_block
from tokprune_nb.adapters.qwen3_vl import Qwen3VLAdapter
from tokprune_nb.merging import Reduction, ToMePrune, VisionZip
from tokprune_nb.testing.tiny import Recorder

PROMPTS = ["what color is the cat ?", "how many dog are there in the picture ?", "describe"]
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def q3():
    return tiny_qwen3_vl(0)


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen3-vl"])
def fam(request):
    f = family_named(request.param)
    model, proc = f.tiny(0)
    return f, model, proc


def lm_calls(model, fn):
    "kwargs the language model received at every call of `fn()`."
    got = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad(): fn()
    finally: h.remove()
    return got


# ---- DeepStack ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [RandomPrune(keep=0.25, seed=1), ClsAttnPrune(keep=0.5), ZSPAPrune(keep=0.3),
                                    RandomPrune(keep=1.0)], ids=repr)
@pytest.mark.parametrize("layout", ["mixed", "two_images", "right"])
def test_every_deepstack_level_gets_exactly_the_kept_tokens(q3, policy, layout):
    model, proc = q3
    tok = proc.tokenizer; side = tok.padding_side
    if layout == "right": tok.padding_side = "right"
    try:
        if layout == "two_images": x = dict(tiny_qwen_inputs(proc, PROMPTS[:2], sizes=[64, 96, (32, 128)], n_images=[2, 1]))
        else: x = dict(tiny_qwen_inputs(proc, PROMPTS, sizes=[64, (32, 96), 128]))
    finally: tok.padding_side = side
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
    with pruned(model, policy) as ctx:
        kw = lm_calls(model, lambda: model(**x))[0]
        sel = last_selection(model)
    levels = kw["deepstack_visual_embeds"]
    assert len(levels) == len(model.config.vision_config.deepstack_visual_indexes) == 3
    ids = ctx.last.kwargs["input_ids"]
    mask = kw["visual_pos_masks"]
    assert torch.equal(mask, ids == model.config.image_token_id)          # the LM's image positions are the kept ones
    for j, lvl in enumerate(levels):
        want = torch.cat([full.deepstack_features[j][i][s] for i, s in enumerate(sel)])
        assert lvl.shape[0] == int(mask.sum())
        assert torch.equal(lvl, want), f"DeepStack level {j} does not hold the kept tokens in placeholder order"
    main = ctx.last.kwargs["mm_encoder_outputs"]["image"].pooler_output
    for f, s, i in zip(main, sel, range(len(sel))): assert torch.equal(f, full.pooler_output[i][s])


def test_deepstack_changes_the_output_and_is_pruned_with_the_tokens(q3):
    "Dropping the DeepStack levels changes the logits: they are really used, so consistency matters."
    model, proc = q3
    x = dict(tiny_qwen_inputs(proc, PROMPTS, sizes=[64] * 3))
    a = Qwen3VLAdapter(model)
    with torch.no_grad():
        p = a.prepare(RandomPrune(keep=0.5, seed=0), x, for_generate=False)
        ref = model(**p.kwargs).logits
        eo = p.kwargs["mm_encoder_outputs"]["image"]
        eo.deepstack_features = [[torch.zeros_like(f) for f in lvl] for lvl in eo.deepstack_features]
        assert not torch.allclose(model(**p.kwargs).logits, ref)


def test_deepstack_gradients_reach_every_merger(q3):
    model, proc = q3
    x = dict(tiny_qwen_inputs(proc, PROMPTS[:1], sizes=[64]))
    model.zero_grad(set_to_none=True)
    with torch.enable_grad(), pruned(model, RandomPrune(keep=0.5)): model(**x).logits.pow(2).mean().backward()
    for m in model.model.visual.deepstack_merger_list[:2]:     # levels 0, 1 feed LLM layers 0, 1 (level 2 adds after the last used layer)
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    model.zero_grad(set_to_none=True)


# ---- positions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [RandomPrune(keep=0.25, seed=2), RelevancePrune(keep=0.5)], ids=repr)
def test_kept_tokens_keep_their_unpruned_positions(fam, policy):
    f, model, proc = fam
    x = dict(f.inputs(proc, PROMPTS, sizes=[(56, 56), (28, 84), (112, 112)]))
    full = lm_calls(model, lambda: model(**x))[0]["position_ids"]
    gfull = lm_calls(model, lambda: model.generate(**x, **GEN))
    with pruned(model, policy) as ctx:
        short = lm_calls(model, lambda: model(**x))[0]["position_ids"]; cols = ctx.position_map
        gshort = lm_calls(model, lambda: model.generate(**x, **GEN))
    if full.shape[0] == 4: full = full[1:]
    if short.shape[0] == 4: short = short[1:]
    for b in range(x["input_ids"].shape[0]):
        real = cols[b] >= 0
        assert torch.equal(short[:, b, real], full[:, b, cols[b][real]])
    assert len(gshort) == len(gfull)
    for s, g in zip(gshort[1:], gfull[1:]):                             # decoding: the same 3D positions
        assert torch.equal(s["position_ids"][-3:], g["position_ids"][-3:])


def test_qwen3_positions_are_the_models_interleaved_mrope(q3):
    model, proc = q3
    assert model.config.text_config.rope_parameters.get("mrope_interleaved", True)
    x = dict(tiny_qwen_inputs(proc, PROMPTS[:1], sizes=[(64, 128)]))
    pos, _ = model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                        image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
    with pruned(model, RandomPrune(keep=1.0)):
        got = lm_calls(model, lambda: model(**x))[0]["position_ids"]
    assert torch.equal(got, pos)
    img = (x["input_ids"][0] == model.config.image_token_id)
    hw = pos[1:, 0, img]
    assert hw[0].unique().numel() == 2 and hw[1].unique().numel() == 4   # a 2×4 merged grid


# ---- saliency ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [tiny_qwen2_vl, tiny_qwen3_vl], ids=["qwen2-vl", "qwen3-vl"])
@pytest.mark.parametrize("layer", [0, -1])
def test_saliency_is_the_attention_received_at_the_block(builder, layer, monkeypatch):
    "Compare against the softmax weights the block itself computes (its eager attention function, recorded)."
    import sys
    model, proc = builder(0, attn_implementation="eager")
    x = dict(tiny_qwen_inputs(proc, PROMPTS[:2], sizes=[(56, 112), 112] if builder is tiny_qwen2_vl else [(64, 128), 128]))
    m = model.model.visual.spatial_merge_size
    mod = sys.modules[type(model.model.visual.blocks[0].attn).__module__]
    calls, eager = [], mod.eager_attention_forward
    def recording(*a, **kw):
        out, w = eager(*a, **kw); calls.append(w.detach()); return out, w
    with torch.no_grad():
        out, grids, sal = full_attention_tokens(model, x["pixel_values"], x["image_grid_thw"], saliency_layer=layer,
                                                chunk_size=7)
        monkeypatch.setattr(mod, "eager_attention_forward", recording)
        model.model.visual(x["pixel_values"], grid_thw=x["image_grid_thw"])
    n_img, b = 2, full_attention_block(model.config.vision_config, layer)
    assert len(calls) == n_img * model.config.vision_config.depth          # one call per block and image
    ref = [w[0].mean(0).mean(0).view(-1, m * m).mean(-1) for w in calls[b * n_img:(b + 1) * n_img]]  # [1,H,N,N] -> [N/m²]
    for s, g in zip(sal, grids): assert s.shape == (g[0] * g[1],)
    torch.testing.assert_close(torch.cat(sal), torch.cat(ref), atol=1e-6, rtol=1e-4)


def test_saliency_layer_is_validated(fam):
    f, model, proc = fam
    x = dict(f.inputs(proc, PROMPTS[:1], sizes=[(56, 56)]))
    depth = model.config.vision_config.depth
    with pytest.raises(ValueError, match="`saliency_layer`"):
        with pruned(model, ClsAttnPrune(keep=0.5, saliency_layer=depth)): model(**x)


# ---- structure, sharing, published geometry, bad inputs ---------------------------------------------------------
def test_adapters_share_qwen2_5_vl():
    assert issubclass(Qwen2VLAdapter, Qwen2_5_VLAdapter) and issubclass(Qwen3VLAdapter, Qwen2VLAdapter)
    own = lambda c: {k for k in vars(c) if not k.startswith("_") and callable(vars(c)[k])}
    assert own(Qwen2VLAdapter) == {"encode_kind"}
    assert own(Qwen3VLAdapter) == {"encode_kind", "encoder_output", "merge_extra"}   # template hooks only


@pytest.mark.parametrize("name,arch", [("qwen2-vl", "qwen2-vl-7b"), ("qwen3-vl", "qwen3-vl-8b")])
def test_published_geometry(name, arch):
    f = family_named(name)
    pub = f.published[arch]
    cfg = pub.config()
    assert type(cfg).__name__ == f.hf_class().config_class.__name__
    proc = f.offline(cfg, pub.image_size)
    x = tiny_qwen_inputs(proc, ["what is in the image ?"], sizes=[pub.image_size])
    assert int((x["input_ids"] == cfg.image_token_id).sum()) == pub.visual_tokens
    if name == "qwen3-vl":
        assert list(cfg.vision_config.deepstack_visual_indexes) == [8, 16, 24]
        paths = [p for p, s in f.flop_parts["projector"] if "deepstack" in p]
        assert len(paths) == len(cfg.vision_config.deepstack_visual_indexes)


@pytest.mark.parametrize("name,size", [("qwen2-vl", 672), ("qwen3-vl", 768)])
def test_mid_geometry(name, size):
    f = family_named(name)
    assert f.mid_image_size == size
    from transformers import AutoConfig
    model, proc = f.mid(0, text_hidden=64, layers=1, vision_hidden=32, vision_depth=4,
                        **({"deepstack": (0, 1, 2)} if name == "qwen3-vl" else {}))
    x = f.inputs(proc, ["what is in the image ?"], sizes=[size])
    assert int((x["input_ids"] == model.config.image_token_id).sum()) == 576


def test_video_pixels_without_placeholders_are_refused(fam):
    "Videos are pruned (tests/test_video.py); video pixels whose `<|video_pad|>` placeholders are missing are refused."
    f, model, proc = fam
    x = dict(f.inputs(proc, PROMPTS[:1], sizes=[(56, 56)]))
    x["pixel_values_videos"] = torch.zeros(8, x["pixel_values"].shape[-1]); x["video_grid_thw"] = torch.tensor([[2, 2, 2]])
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="holds no video token"): model(**x)


@pytest.mark.parametrize("make", [lambda: ZSPAPrune(keep=0.3, merge_pruned=True), lambda: ToMePrune(0.25),
                                  lambda: VisionZip(0.3)], ids=["zspaprune+merge", "tome", "visionzip"])
def test_merged_slots_get_merged_deepstack_features(q3, make):
    """A merging policy's merged slots get every DeepStack level merged with the policy's own groups (Σ weight·level over
    the tokens merged into the slot); unmerged kept slots keep their own level features, bit for bit; three images,
    batched. For LLM-space merges the same groups reproduce the merged main features."""
    model, proc = q3
    x = dict(tiny_qwen_inputs(proc, PROMPTS, sizes=[64, (32, 96), 128]))
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
    rec = Recorder(make())
    with pruned(model, rec) as ctx:
        kw = lm_calls(model, lambda: model(**x))[0]
        sel = last_selection(model)
    red = rec.results[-1]
    assert isinstance(red, Reduction) and red.batched and red.assign is not None
    main = ctx.last.kwargs["mm_encoder_outputs"]["image"].pooler_output
    row = lambda t, i, n: t[i, :n]
    n_merged = 0
    for i, s in enumerate(sel):
        N, k = full.pooler_output[i].shape[0], s.numel()
        a, w, merged = row(red.assign, i, N), row(red.weight, i, N), row(red.size, i, k) > 1
        if not isinstance(rec.policy, VisionZip): assert (a >= 0).all()   # merge-back, ToMe: every token is in a slot
        n_merged += int(merged.sum()); u = a >= 0                 # (VisionZip with no contextual budget drops tokens)
        combine = lambda src: torch.zeros(k, src.shape[-1]).index_add_(0, a[u], src[u].float() * w[u][:, None])
        if red.space == "llm":
            torch.testing.assert_close(main[i][merged].float(), combine(full.pooler_output[i])[merged], atol=1e-5, rtol=1e-4)
        off = sum(t.numel() for t in sel[:i])
        for j, lvl in enumerate(kw["deepstack_visual_embeds"]):
            got, own = lvl[off:off + k], full.deepstack_features[j][i]
            assert torch.equal(got[~merged], own[s][~merged])
            torch.testing.assert_close(got[merged].float(), combine(own)[merged], atol=1e-5, rtol=1e-4)
            if merged.any(): assert not torch.allclose(got[merged], own[s][merged])   # not the target's own any more
    assert n_merged > 0

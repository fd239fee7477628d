"""Qwen2.5-VL adapter: identity at keep=1, real pruning, 3D M-RoPE positions, restoration, bad inputs.

Runs on a tiny random-initialised Qwen2.5-VL (tokprune_nb.testing.tiny.tiny_qwen2_5_vl) with the real processor.
"""
import os
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.testing.tiny import tiny_qwen2_5_vl, tiny_qwen_inputs
from tokprune_nb.adapters.qwen2_5_vl import Qwen2_5_VLAdapter, qwen_vision_tokens, qwen_saliency_block, temporarily
from tokprune_nb.policies import RelevancePrune, ClsAttnPrune, RandomPrune, ZSPAPrune, ATP

PROMPTS = ["what color is the cat ?", "how many dog are there in the picture ?", "describe"]
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def tiny():
    model, proc = tiny_qwen2_5_vl(seed=0)
    return model, proc


@pytest.fixture(scope="module")
def batch3(tiny):
    return tiny_qwen_inputs(tiny[1], PROMPTS, seed=1)


@pytest.fixture(scope="module")
def mixed(tiny):
    "Three samples whose images have different sizes: 16, 36 and 16 visual tokens; rows lose different counts."
    return tiny_qwen_inputs(tiny[1], PROMPTS, seed=2, size=[112, 168, 112])


class Recorder:
    "Records what the language model receives (sequence length and position ids) at every call."
    def __init__(self, model):
        self.lm, self.lens, self.pos = model.model.language_model, [], []
    def __enter__(self):
        def hook(mod, args, kw):
            self.lens.append(kw["inputs_embeds"].shape[1]); self.pos.append(kw["position_ids"].clone())
        self.h = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        return self
    def __exit__(self, *a): self.h.remove()


def n_image_tokens(model, inputs):
    return (inputs["input_ids"] == model.config.image_token_id).sum(1)


# ---------------------------------------------------------------- real pruning

def test_quarter_reaches_language_model(tiny, batch3):
    model, _ = tiny
    L = batch3["input_ids"].shape[1]
    n = int(n_image_tokens(model, batch3)[0])
    k = n // 4
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.25)) as ctx, Recorder(model) as rec:
        out = model(**batch3)
        sel = last_selection(model)
        g = model.generate(**batch3, **GEN)
    assert rec.lens[0] == L - (n - k)
    assert out.logits.shape[:2] == (3, L - (n - k))
    assert rec.lens[1] == L - (n - k) and rec.lens[2:] == [1] * (GEN["max_new_tokens"] - 1)
    assert g.shape == (3, L + GEN["max_new_tokens"]) and torch.equal(g[:, :L], batch3["input_ids"])
    assert [len(s) for s in sel] == [k] * 3
    # the LM's image tokens are exactly the kept ones
    ids = ctx.last.kwargs["input_ids"]
    assert (ids == model.config.image_token_id).sum(1).tolist() == [k] * 3


def test_prompt_aware_selection_differs_per_sample(tiny):
    model, proc = tiny
    same_images = tiny_qwen_inputs(proc, PROMPTS, seed=3)
    # the same image for all three samples: only the prompt differs
    pv = same_images["pixel_values"].view(3, -1, same_images["pixel_values"].shape[-1])
    same_images["pixel_values"] = pv[:1].expand(3, -1, -1).reshape(-1, pv.shape[-1]).clone()
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.25)):
        model(**same_images)
    sel = [s.tolist() for s in last_selection(model)]
    assert len({tuple(s) for s in sel}) > 1, sel


def test_batch_selection_equals_single(tiny, batch3):
    "Selecting in a padded batch gives each sample what it gets alone."
    model, proc = tiny
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.25)):
        model(**batch3); batch_sel = last_selection(model)
        for i, p in enumerate(PROMPTS):
            one = tiny_qwen_inputs(proc, [p], seed=1)
            one["pixel_values"] = batch3["pixel_values"].view(3, -1, batch3["pixel_values"].shape[-1])[i]
            model(**one)
            assert torch.equal(last_selection(model)[0], batch_sel[i])


def test_mixed_sizes_repad(tiny, mixed):
    model, _ = tiny
    n = n_image_tokens(model, mixed).tolist()
    assert n == [16, 36, 16]
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.25)) as ctx:
        out = model(**mixed)
        g = model.generate(**mixed, **GEN)
    kw = ctx.last.kwargs
    kept = (kw["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert kept == [4, 9, 4]
    assert out.logits.shape[1] == kw["input_ids"].shape[1]
    assert g.shape == (3, mixed["input_ids"].shape[1] + GEN["max_new_tokens"])


def test_pruned_forward_equals_manual_reference(tiny, batch3):
    """The pruned forward equals the unpruned model's own computation with the dropped image tokens removed:
    full input embeddings (text + merger outputs) and 3D positions built independently, the dropped columns cut out,
    then the language model and lm_head."""
    model, _ = tiny
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.25)) as ctx:
        out = model(**batch3).logits
    sel, cols = last_selection(model), ctx.position_map
    ids, am = batch3["input_ids"], batch3["attention_mask"]
    img = ids == model.config.image_token_id
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(batch3["pixel_values"], batch3["image_grid_thw"]).pooler_output
        emb[img] = torch.cat(feats)
        pos, _ = model.model.get_rope_index(ids, batch3["mm_token_type_ids"], batch3["image_grid_thw"], attention_mask=am)
        # independent check of which columns were kept: text + the selected image tokens of each row
        for b in range(3):              # (-1 = padding added after pruning; the original padding is gone)
            want = torch.cat([torch.nonzero(~img[b] & am[b].bool()).view(-1), torch.nonzero(img[b]).view(-1)[sel[b]]]).sort().values
            assert torch.equal(cols[b][cols[b] >= 0], want)
        real = cols >= 0; cols = cols.clamp(min=0)
        e = torch.stack([emb[b, cols[b]] for b in range(3)])
        p = torch.stack([pos[:, b, cols[b]] for b in range(3)], 1)
        m = torch.stack([am[b, cols[b]] for b in range(3)]) * real
        h = model.model.language_model(inputs_embeds=e, attention_mask=m, position_ids=p).last_hidden_state
        ref = model.lm_head(h)
    assert torch.allclose(out[real], ref[real], atol=1e-5), (out[real] - ref[real]).abs().max()


def test_beams_and_multiple_sequences_identity(tiny, batch3):
    model, _ = tiny
    for kw in (dict(num_beams=2, do_sample=False), dict(num_return_sequences=2, do_sample=True)):
        with torch.no_grad():
            torch.manual_seed(0); ref = model.generate(**batch3, max_new_tokens=3, **kw)
            with pruned(model, RelevancePrune(keep=1.0)):
                torch.manual_seed(0); out = model.generate(**batch3, max_new_tokens=3, **kw)
            with pruned(model, RelevancePrune(keep=0.25)):
                short = model.generate(**batch3, max_new_tokens=3, **kw)
        assert torch.equal(out, ref)
        assert short.shape == ref.shape


# ---------------------------------------------------------------- positions

def _positions_match(model, inputs, policy):
    with torch.no_grad(), Recorder(model) as full:
        model.generate(**inputs, **GEN)
    with torch.no_grad(), pruned(model, policy) as ctx, Recorder(model) as short:
        model.generate(**inputs, **GEN)
    cols = ctx.position_map
    B = inputs["input_ids"].shape[0]
    # prefill: every kept token (text tokens and kept image tokens) has its unpruned 3D position
    for b in range(B):
        real = cols[b] >= 0
        assert torch.equal(short.pos[0][1:, b, real], full.pos[0][1:, b, cols[b][real]])
    # text tokens keep theirs
    text = (inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()
    for b in range(B):
        real = cols[b] >= 0
        is_text = text[b, cols[b][real]]
        assert torch.equal(short.pos[0][1:, b, real][:, is_text], full.pos[0][1:, b, text[b]])
    # decoding: the same M-RoPE positions as the unpruned model at every step
    assert len(short.pos) == len(full.pos)
    for s, f in zip(short.pos[1:], full.pos[1:]):
        assert torch.equal(s[1:], f[1:])
    # row 0 (mask index of generate's [4,B,L] ids) is the running index of the shortened sequence
    assert short.pos[0].shape[0] == 4
    am = ctx.last.kwargs.get("attention_mask")
    exp = (am.cumsum(-1) - 1).masked_fill(am == 0, 0) if am is not None else torch.arange(cols.shape[1]).expand(B, -1)
    assert torch.equal(short.pos[0][0], exp)


def test_generation_continues_original_positions(tiny, batch3):
    _positions_match(tiny[0], batch3, RelevancePrune(keep=0.25))


def test_generation_positions_mixed_sizes(tiny, mixed):
    _positions_match(tiny[0], mixed, RandomPrune(keep=0.3, seed=1))


def test_generation_positions_batch1(tiny):
    model, proc = tiny
    _positions_match(model, tiny_qwen_inputs(proc, PROMPTS[:1], seed=5), ClsAttnPrune(keep=0.25))


def test_forward_positions_and_rope_deltas(tiny, batch3):
    model, _ = tiny
    with torch.no_grad(), Recorder(model) as full:
        model(**batch3)
    old = model.model.rope_deltas
    with torch.no_grad(), pruned(model, RelevancePrune(keep=0.5)) as ctx, Recorder(model) as short:
        model(**batch3)
        deltas = ctx.adapter.rope_deltas
    assert short.pos[0].shape[0] == 3                      # forward gets [3,B,S], as the model builds itself
    cols = ctx.position_map
    for b in range(3):
        real = cols[b] >= 0
        assert torch.equal(short.pos[0][:, b, real], full.pos[0][:, b, cols[b][real]])
    # shortened rope_deltas put the next token after the ORIGINAL maximum position
    valid = ctx.last.kwargs["attention_mask"].sum(1)       # HF convention: next position = valid length + delta
    assert torch.equal((valid + deltas.view(-1)), full.pos[0].amax((0, 2)) + 1)
    assert model.model.rope_deltas is old                   # forward leaves the model's cache attribute alone


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(0.05, 1.0), seed=st.integers(0, 3))
def test_property_kept_count_and_positions(tiny, keep, seed):
    model, proc = tiny
    inputs = tiny_qwen_inputs(proc, PROMPTS[:2], seed=seed, size=[112, 140])
    n = n_image_tokens(model, inputs).tolist()
    with torch.no_grad(), Recorder(model) as full:
        model(**inputs)
    pol = RandomPrune(keep=keep, seed=seed)
    with torch.no_grad(), pruned(model, pol) as ctx, Recorder(model) as short:
        model(**inputs)
    kept = (ctx.last.kwargs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert kept == [pol.budget(x) for x in n]
    cols = ctx.position_map
    for b in range(2):
        real = cols[b] >= 0
        assert torch.equal(short.pos[0][:, b, real], full.pos[0][:, b, cols[b][real]])


# ---------------------------------------------------------------- vision pass, saliency, grid

def test_sdpa_default_no_eager(tiny, batch3):
    model, _ = tiny
    assert model.config._attn_implementation == "sdpa"
    assert model.model.visual.config._attn_implementation == "sdpa"
    with torch.no_grad(), pruned(model, ClsAttnPrune(keep=0.25)):
        model(**batch3)
    assert model.config._attn_implementation == "sdpa"


def test_features_and_grid_match_model(tiny, mixed):
    model, _ = tiny
    with torch.no_grad():
        feats, grids, sal = qwen_vision_tokens(model, mixed["pixel_values"], mixed["image_grid_thw"], saliency_layer=-1)
        ref = model.model.get_image_features(mixed["pixel_values"], mixed["image_grid_thw"]).pooler_output
    assert grids == [(4, 4), (6, 6), (4, 4)]
    for f, r in zip(feats, ref): assert torch.equal(f, r)
    for s, (h, w) in zip(sal, grids):
        assert s.shape == (h * w,) and torch.isfinite(s).all()
        assert torch.allclose(s.sum(), torch.tensor(0.25), atol=1e-5)   # attention mass 1 over 4x as many patches
    pos, _ = model.model.get_rope_index(mixed["input_ids"], mixed["mm_token_type_ids"], mixed["image_grid_thw"],
                                        attention_mask=mixed["attention_mask"])
    for b, (h, w) in enumerate(grids):
        p = pos[:, b, mixed["input_ids"][b] == model.config.image_token_id]
        i = torch.arange(h * w)
        assert torch.equal(p[1] - p[1, 0], i // w) and torch.equal(p[2] - p[2, 0], i % w)


def test_saliency_window_order(tiny, mixed):
    "Scoring in window order and un-permuting equals scoring in raster order."
    from transformers.vision_utils import get_vision_window_index
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    model, _ = tiny
    visual = model.model.visual
    blk = visual.blocks[qwen_saliency_block(visual.config, -1)].attn
    seen = {}
    h = blk.register_forward_pre_hook(lambda m, a, kw: seen.update(hs=a[0], pe=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        _, grids, sal = qwen_vision_tokens(model, mixed["pixel_values"], mixed["image_grid_thw"], saliency_layer=-1)
    h.remove()
    wi, _ = get_vision_window_index(mixed["image_grid_thw"], 2, visual.window_size, visual.patch_size)
    assert not torch.equal(wi, torch.arange(len(wi)))     # the windows really reorder tokens
    unwin = lambda x: x.reshape(len(wi), 4, -1)[torch.argsort(wi)].reshape(x.shape[0], -1)
    hs, cos, sin = unwin(seen["hs"]), unwin(seen["pe"][0]), unwin(seen["pe"][1])
    with torch.no_grad():
        q, k, _ = blk.qkv(hs).reshape(hs.shape[0], 3, blk.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    start = 0
    for s, (gh, gw) in zip(sal, grids):
        P = gh * gw * 4
        qi, ki = q[start:start + P].transpose(0, 1), k[start:start + P].transpose(0, 1)
        a = (qi @ ki.transpose(-1, -2) * blk.scaling).softmax(-1)
        assert torch.allclose(s, a.mean((0, 1)).view(-1, 4).mean(-1), atol=1e-6)
        start += P


def test_saliency_block_mapping():
    from types import SimpleNamespace
    vc = SimpleNamespace(depth=32, fullatt_block_indexes=[7, 15, 23, 31])
    assert [qwen_saliency_block(vc, l) for l in (-1, -2, -9, -13, 0, 10)] == [31, 31, 23, 23, 7, 7]
    with pytest.raises(ValueError, match="saliency_layer"): qwen_saliency_block(vc, 40)


# ---------------------------------------------------------------- restoration

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, set(model.__dict__), type(model), model.model.rope_deltas


def test_temporarily_restores():
    class O: pass
    o = O(); o.a = 1
    with temporarily(o, "a", 2): assert o.a == 2
    assert o.a == 1
    with pytest.raises(RuntimeError):
        with temporarily(o, "b", 3): raise RuntimeError
    assert not hasattr(o, "b")
    O.c = 5                                                # a class attribute: shadowed, then unshadowed
    with temporarily(o, "c", 6): assert o.c == 6
    assert o.c == 5 and "c" not in vars(o)
    m = torch.nn.Module(); m.register_buffer("buf", torch.zeros(2))   # a module buffer: restored in place
    with temporarily(m, "buf", torch.ones(2)): assert m.buf.sum() == 2
    assert m.buf.sum() == 0 and "buf" in m._buffers


# ---------------------------------------------------------------- bad inputs

def test_no_image(tiny, batch3):
    model, proc = tiny
    text_only = {k: v for k, v in batch3.items() if k not in ("pixel_values", "image_grid_thw")}
    with pruned(model, RelevancePrune(keep=0.25)):
        with pytest.raises(ValueError, match="no image in the inputs"): model(**text_only)
        with pytest.raises(ValueError, match="no image in the inputs"): model.generate(**text_only, **GEN)


def test_missing_grid(tiny, batch3):
    model, _ = tiny
    bad = {k: v for k, v in batch3.items() if k != "image_grid_thw"}
    with pruned(model, RelevancePrune(keep=0.25)):
        with pytest.raises(ValueError, match="image_grid_thw"): model(**bad)


def test_keep_larger_than_tokens(tiny, batch3):
    model, _ = tiny
    calls = []
    h = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pruned(model, RelevancePrune(keep=17)):
            with pytest.raises(ValueError, match="16 visual tokens"): model(**batch3)
    finally: h.remove()
    assert calls == []                                      # rejected before the vision pass


def test_policy_needing_clip(tiny, batch3):
    model, _ = tiny
    class NeedsClip(RelevancePrune):
        @property
        def needs(self): return frozenset({"prompt", "clip_feats"})
    with pytest.raises(ValueError, match="no CLIP-space patch embeddings"):
        Qwen2_5_VLAdapter(model).prepare(NeedsClip(keep=0.25), dict(batch3), for_generate=False)
    with pytest.raises(ValueError, match="clip"):         # through pruned(): refused before any call
        with pruned(model, NeedsClip(keep=0.25)): model(**batch3)


def test_user_position_ids_refused_and_video_pixels_need_placeholders(tiny, batch3):
    "Videos are pruned (tests/test_video.py); video pixels without `<|video_pad|>` placeholders are refused."
    model, _ = tiny
    with pruned(model, RelevancePrune(keep=0.25)):
        with pytest.raises(ValueError, match="position_ids"):
            model(**batch3, position_ids=torch.zeros(3, *batch3["input_ids"].shape, dtype=torch.long))
        with pytest.raises(ValueError, match="holds no video token"):
            model(**batch3, pixel_values_videos=torch.zeros(8, 1176), video_grid_thw=torch.tensor([[2, 2, 2]]))


def test_placeholder_count_mismatch(tiny, batch3):
    model, _ = tiny
    bad = dict(batch3)
    bad["image_grid_thw"] = batch3["image_grid_thw"].clone(); bad["image_grid_thw"][0, 1] = 4   # claims 2x4 merged
    with pruned(model, RelevancePrune(keep=0.25)):
        with pytest.raises(ValueError, match="do not match"): model(**bad)


# ---------------------------------------------------------------- real checkpoint

@pytest.mark.skipif(not os.environ.get("TOKPRUNE_QWEN_PATH"),
                    reason="set TOKPRUNE_QWEN_PATH to a local Qwen2.5-VL checkpoint to run this test")
def test_real_checkpoint_identity_and_pruning():
    from PIL import Image, ImageDraw
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    path = os.environ["TOKPRUNE_QWEN_PATH"]
    proc = AutoProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    img = Image.new("RGB", (448, 448), "navy"); ImageDraw.Draw(img).rectangle([150, 150, 300, 300], fill="red")
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            for q in ("What colour is the square?", "Describe the background in one word.")]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    inputs = proc(text=texts, images=[img, img], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with pruned(model, ZSPAPrune(keep=1.0)):
            assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), ref)
        with pruned(model, ZSPAPrune(keep=0.25)), Recorder(model) as rec:
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    n = int(n_image_tokens(model, inputs)[0])
    assert rec.lens[0] == inputs["input_ids"].shape[1] - (n - round(0.25 * n))
    assert out.shape[0] == 2


def test_atp_prompt_relevance_runs_without_clip(tiny, batch3):
    """ATP(relevance="prompt") needs only prompt + saliency, both of which Qwen2.5-VL provides; the CLIP form is refused
    up front with a Qwen-specific message."""
    model, _ = tiny
    n = int(n_image_tokens(model, batch3)[0])
    with torch.no_grad(), pruned(model, ATP(keep=0.25, alpha=0.5, relevance="prompt")):
        g = model.generate(**batch3, **GEN)
        sel = last_selection(model)
    assert [len(s) for s in sel] == [n // 4] * 3 and g.shape[0] == 3
    with pytest.raises(ValueError, match="no CLIP-space patch embeddings"):
        with pruned(model, ATP(keep=0.25)):
            pass

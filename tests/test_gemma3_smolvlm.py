"""Gemma 3 and SmolVLM specifics (the conformance suite covers the rest): Gemma 3's bidirectional image blocks survive
shortening (the LM's full-attention mask is the original one restricted to the kept positions), saliency equals an
independent eager-attention reference pooled like the features; SmolVLM keeps every tile's markers, one budget per image (its tiles + global)."""
import pytest
import torch
import torch.nn.functional as F
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.testing.tiny import Recorder
from tokprune_nb.policies import RandomPrune, ClsAttnPrune, UniformPrune
from tokprune_nb.testing.tiny_gemma import tiny_gemma3
from tokprune_nb.testing.tiny_smolvlm import tiny_smolvlm
from tokprune_nb.testing.tiny_more import chat_inputs

PROMPTS = ["what color is the cat ?", "how many dog are there ?", "describe"]


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3(0)


def lm_masks(model, fn):
    got = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(kw["attention_mask"]), with_kwargs=True)
    try:
        with torch.no_grad(): fn()
    finally: h.remove()
    return got[0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", [RandomPrune(keep=0.25, seed=2), ClsAttnPrune(keep=0.5)], ids=repr)
def test_gemma3_image_blocks_are_the_original_ones_restricted(gemma, side, policy):
    model, proc = gemma
    tok = proc.tokenizer; old = tok.padding_side; tok.padding_side = side
    try: x = chat_inputs(proc, PROMPTS, sizes=[56] * 4, n_images=[2, 1, 1])
    finally: tok.padding_side = old
    full = lm_masks(model, lambda: model(**x))["full_attention"]
    with pruned(model, policy) as ctx:
        short = lm_masks(model, lambda: model(**x))["full_attention"]
    pmap, ids = ctx.last.position_map, ctx.last.kwargs["input_ids"]
    img = model.config.image_token_id
    for b in range(ids.shape[0]):
        real = pmap[b] >= 0
        cols = pmap[b][real]
        assert torch.equal(short[b, 0][real][:, real], full[b, 0][cols][:, cols])
        pos = torch.nonzero(ids[b] == img).flatten()
        assert bool(short[b, 0, pos[0], pos[1]])              # a kept image token sees a later one of its image
    tt = ctx.last.kwargs["token_type_ids"]
    assert torch.equal(tt.bool() & (ctx.last.kwargs["attention_mask"].bool()), ids == img)


def test_gemma3_saliency_is_attention_received_pooled_4x4(gemma):
    model, proc = gemma
    x = chat_inputs(proc, PROMPTS[:1], sizes=[56])
    rec = Recorder(ClsAttnPrune(keep=0.5, saliency_layer=-1))     # needs the saliency of the last layer
    with pruned(model, rec), torch.no_grad(): model(**x)
    seen = [ts.saliency for ts in rec.calls]
    tower = model.model.vision_tower
    old = tower.config._attn_implementation; tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad(): att = tower(pixel_values=x["pixel_values"], output_attentions=True).attentions[-1]
    finally: tower.config._attn_implementation = old
    pps = model.model.multi_modal_projector.patches_per_image
    k = model.model.multi_modal_projector.kernel_size
    ref = F.avg_pool2d(att.mean(1).mean(1).view(-1, 1, pps, pps), k).flatten()
    torch.testing.assert_close(seen[0].flatten(), ref, atol=1e-5, rtol=1e-4)


def test_gemma3_refuses_clip_policies(gemma):
    from tokprune_nb.policies import ATP
    model, _ = gemma
    with pytest.raises(ValueError, match="CLIP"):
        with pruned(model, ATP(keep=0.5)): pass


def test_smolvlm_markers_kept_and_one_budget_per_image():
    model, proc = tiny_smolvlm(0)
    x = chat_inputs(proc, PROMPTS[:2], sizes=[56, (28, 84), 112], n_images=[2, 1])
    with pruned(model, RandomPrune(keep=1.0)), torch.no_grad(): model(**x)
    n = [len(s) for s in last_selection(model)]
    with pruned(model, RandomPrune(keep=0.3, seed=1)) as ctx, torch.no_grad(): model(**x)
    assert n == [5 * 16, 3 * 16, 5 * 16]                         # per image: 2×2 tiles + global, 1×2 + global, 2×2 + global
    assert [len(s) for s in last_selection(model)] == [RandomPrune(keep=0.3).budget(k) for k in n]
    short, tok = ctx.last.kwargs["input_ids"], proc.tokenizer
    from tokprune_nb.testing.tiny_smolvlm import SMOLVLM_SPECIALS
    markers = [t for t in SMOLVLM_SPECIALS if t.startswith("<row_") or t in ("<global-img>", "<fake_token_around_image>")]
    assert any(int((x["input_ids"] == tok.convert_tokens_to_ids(t)).sum()) for t in markers if t.startswith("<row_2"))
    for t in markers:
        i = tok.convert_tokens_to_ids(t)
        assert int((short == i).sum()) == int((x["input_ids"] == i).sum()), t
    assert int((short == model.config.image_token_id).sum()) == sum(len(s) for s in last_selection(model))

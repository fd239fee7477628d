"""LLaVA-OneVision and InternVL specifics beyond the conformance suite: the newline rule on anyres-max layouts (also
when the model shrinks the tiles bilinearly), SigLIP saliency without a CLS token, InternVL's tiles + thumbnail and
pixel-shuffled CLS saliency, published geometry, bad inputs."""
import pytest
import torch
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.policies import RandomPrune, ClsAttnPrune, ZSPAPrune
from tokprune_nb.adapters.llava_onevision import LlavaOnevisionAdapter, llava_onevision_7b_config
from tokprune_nb.adapters.internvl import InternVLAdapter, ImageFeatureList, image_runs, internvl3_8b_config
from tokprune_nb.testing.tiny_more import (tiny_llava_onevision, tiny_internvl, chat_inputs, onevision_offline,
                                           internvl_offline)

PROMPTS = ["what color is the cat ?", "how many dog are there in the picture ?", "describe"]


@pytest.fixture(scope="module")
def ov():
    return tiny_llava_onevision(0, attn_implementation="eager")


@pytest.fixture(scope="module")
def ivl():
    return tiny_internvl(0, attn_implementation="eager")


def lm_kwargs(model, fn):
    got = []
    h = model.model.register_forward_pre_hook(lambda m, a, kw: got.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad(): fn()
    finally: h.remove()
    return got[0]


# ---- LLaVA-OneVision ---------------------------------------------------------------------------------------------
def _ov_layout(model, x):
    "Per image: the packed features, the newline mask, and the row of every position (-1: base crop)."
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"], batch_num_images=x["batch_num_images"],
                                              return_dict=True).pooler_output
    nl = model.model.image_newline
    return [(f, (f == nl.to(f)).all(-1)) for f in full]


@pytest.mark.parametrize("policy", [RandomPrune(keep=0.25, seed=1), ClsAttnPrune(keep=0.3), ZSPAPrune(keep=0.5)], ids=repr)
@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_onevision_lm_gets_kept_tokens_and_their_rows_newlines(policy, aspect):
    model, proc = tiny_llava_onevision(0, vision_aspect_ratio=aspect)
    x = chat_inputs(proc, PROMPTS, sizes=[56, (28, 84), 56, 28], n_images=[1, 1, 2])
    layout = _ov_layout(model, x)
    with pruned(model, policy) as ctx:
        kw = lm_kwargs(model, lambda: model(**x))
        sel = last_selection(model)
    feats = kw["mm_encoder_outputs"]["image"].pooler_output
    for (full, is_nl), s, f in zip(layout, sel, feats):
        cand = torch.nonzero(~is_nl).flatten()
        assert len(s) == policy.budget(len(cand))
        row = torch.cumsum(is_nl.long(), 0) - is_nl.long()         # newlines before each position
        kept = cand[s]
        single = int(is_nl.sum()) == 1                             # one crop: its one newline always stays
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        rows_kept = set(row[kept[kept >= (0 if single else side * side)]].tolist())   # the base crop comes first: no row
        want_nl = [int(p) for p in torch.nonzero(is_nl).flatten() if single or int(row[p]) in rows_kept]
        slots = torch.sort(torch.cat([kept, torch.tensor(want_nl, dtype=torch.long)])).values
        assert torch.equal(f, full[slots]), "the LM must get the kept tokens plus exactly their rows' newlines, in order"
    assert int((ctx.last.kwargs["input_ids"] == model.config.image_token_id).sum()) == sum(f.shape[0] for f in feats)


def test_onevision_keep_all_bit_exact_when_shrunk():
    model, proc = tiny_llava_onevision(0, vision_aspect_ratio="anyres_max_1")
    x = chat_inputs(proc, PROMPTS[:2], sizes=[56, (56, 84)])
    with torch.no_grad():
        ref = model(**x).logits
        with pruned(model, ClsAttnPrune(keep=1.0)): assert torch.equal(model(**x).logits, ref)


def test_onevision_saliency_is_mean_attention_received(ov):
    "SigLIP has no CLS: saliency = head-averaged attention each token receives inside its crop, at the requested layer."
    model, proc = ov
    x = chat_inputs(proc, PROMPTS[:1], sizes=[28, 56], n_images=[2])   # a multi-image sample: one crop per image
    ad = LlavaOnevisionAdapter(model)
    for layer in (-1, 0):
        imgs = ad.encode(dict(x), frozenset({"saliency"}), ClsAttnPrune(keep=0.5, saliency_layer=layer))
        with torch.no_grad():
            att = model.model.vision_tower(x["pixel_values"][:, 0], output_attentions=True).attentions[layer]
        want = att.mean(1).mean(1)                         # [crops, L]: mean over heads, then over queries
        for i, im in enumerate(imgs):
            assert im.grid == (4, 4)
            torch.testing.assert_close(im.saliency, want[i].float(), atol=1e-6, rtol=1e-5)


def test_onevision_tiled_saliency_follows_the_packing(ov):
    "Tile tokens carry their own crop's scores in packed (unpadded, row-major over the tile grid) order."
    model, proc = ov
    x = chat_inputs(proc, PROMPTS[:1], sizes=[(28, 56)])                # base + 1×2 tiles
    ad = LlavaOnevisionAdapter(model)
    im = ad.encode(dict(x), frozenset({"saliency"}), ClsAttnPrune(keep=0.5, saliency_layer=-1))[0]
    with torch.no_grad():
        att = model.model.vision_tower(x["pixel_values"][0, :3], output_attentions=True).attentions[-1]
    s = att.mean(1).mean(1).view(3, 4, 4)
    tiles = torch.cat([s[1], s[2]], dim=1).flatten()                   # one 4×8 grid over the two tiles
    torch.testing.assert_close(im.saliency, torch.cat([s[0].flatten(), tiles]).float(), atol=1e-6, rtol=1e-5)
    assert im.grid is None and im.extra["newline"].numel() == 4


def test_onevision_needs_image_sizes(ov):
    model, proc = ov
    x = chat_inputs(proc, PROMPTS[:1]); x.pop("image_sizes")
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="`image_sizes`"): model(**x)


def test_onevision_published_geometry():
    cfg = llava_onevision_7b_config()
    assert (cfg.vision_config.model_type, cfg.vision_config.image_size, cfg.vision_config.patch_size) == ("siglip_vision_model", 384, 14)
    assert cfg.vision_feature_select_strategy == "full" and cfg.vision_aspect_ratio == "anyres_max_9"
    proc = onevision_offline(cfg, 384)
    x = chat_inputs(proc, ["describe", "describe"], sizes=[384, 768])
    assert (x["input_ids"] == cfg.image_token_id).sum(1).tolist() == [2 * 729 + 27, 729 + 54 * 54 + 54]


# ---- InternVL ------------------------------------------------------------------------------------------------------
def test_internvl_tiles_and_thumbnail(ivl):
    model, proc = ivl
    x = chat_inputs(proc, PROMPTS, sizes=[(56, 56), (56, 112), (112, 112)])
    runs = image_runs(x["input_ids"], model.config.image_token_id)
    assert runs == [16, 48, 80]                          # 1 tile; 2 tiles + thumbnail; 4 tiles + thumbnail
    with torch.no_grad(): full = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output
    with pruned(model, ClsAttnPrune(keep=0.25)) as ctx:
        kw = lm_kwargs(model, lambda: model(**x))
        sel = last_selection(model)
    feats = kw["mm_encoder_outputs"]["image"].pooler_output
    assert isinstance(feats, ImageFeatureList) and [len(s) for s in sel] == [4, 12, 20]
    per_image = list(full.flatten(0, 1).split(runs))
    for f, s, p in zip(feats, sel, per_image): assert torch.equal(f, p[s])
    assert torch.equal(feats.to(torch.float32), torch.cat(list(feats)))


def test_internvl_saliency_is_cls_attention_per_2x2_block(ivl):
    model, proc = ivl
    x = chat_inputs(proc, PROMPTS[:2], sizes=[(56, 56), (56, 112)])
    ad = InternVLAdapter(model)
    for layer in (-1, 0):
        imgs = ad.encode(dict(x), frozenset({"saliency"}), ClsAttnPrune(keep=0.5, saliency_layer=layer))
        with torch.no_grad():
            att = model.model.vision_tower(pixel_values=x["pixel_values"], output_attentions=True).attentions[layer]
        cls = att[:, :, 0, 1:].mean(1)                     # [tiles, 64]: CLS row, head-averaged
        # which patches make each token: pixel-shuffle a patch-index map the way the model shuffles features
        idx = torch.arange(64, dtype=torch.float32).view(1, 8, 8, 1)
        groups = model.model.pixel_shuffle(idx, 0.5).reshape(16, 4).long()
        want = cls[:, groups].mean(-1)                     # [tiles, 16]
        assert sorted(groups.flatten().tolist()) == list(range(64))
        torch.testing.assert_close(imgs[0].saliency, want[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(imgs[1].saliency, want[1:4].flatten(), atol=1e-6, rtol=1e-5)
        assert imgs[0].grid == (4, 4) and imgs[1].grid is None


def test_internvl_brackets_are_not_prompt(ivl):
    model, proc = ivl
    x = chat_inputs(proc, PROMPTS[:1])
    ad = InternVLAdapter(model)
    ad.prepare(RandomPrune(keep=0.5), dict(x), for_generate=False)
    tok = proc.tokenizer
    assert set(ad.special_token_ids()) == {tok.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>")}


def test_internvl_placeholder_mismatch_is_named(ivl):
    model, proc = ivl
    x = chat_inputs(proc, PROMPTS[:1], sizes=[(56, 112)])
    ids = x["input_ids"].clone(); img = model.config.image_token_id
    first = int(torch.nonzero(ids[0] == img)[0]); ids[0, first] = proc.tokenizer.convert_tokens_to_ids("cat")
    x["input_ids"] = ids
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="image tokens do not match"): model(**x)


def test_internvl_published_geometry():
    cfg = internvl3_8b_config()
    assert cfg.downsample_ratio == 0.5 and cfg.vision_feature_select_strategy == "default"
    proc = internvl_offline(cfg, 448)
    assert proc.image_seq_length == 256
    x = chat_inputs(proc, ["describe", "describe"], sizes=[(448, 448), (448, 896)])
    assert image_runs(x["input_ids"], cfg.image_token_id) == [256, 3 * 256]

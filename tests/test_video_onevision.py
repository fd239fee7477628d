"""LLaVA-OneVision video (issue 14): clips (`pixel_values_videos`, frames pooled 2×2 by the model, one newline per clip)
are pruned instead of refused — one TokenSet per clip with grid (frames, h, w), one budget per clip, the newline kept,
keep=1.0 bit-exact (logits and greedy generate), the LM sees exactly the kept video tokens, image + video batches.
Inputs are hand-built (`testing.video.onevision_video_inputs`): the video processor needs torchvision."""
import pytest
import torch
import torch.nn.functional as F
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.testing.tiny import Recorder
from tokprune_nb.policies import RandomPrune, UniformPrune, ZSPAPrune, ClsAttnPrune, DivPrune
from tokprune_nb.temporal import TemporalPrune, temporal_dissimilarity
from tokprune_nb.testing.tiny_more import tiny_llava_onevision
from tokprune_nb.testing.video import onevision_video_inputs

PROMPTS = ["what color is the cat ?", "how many dog are there in the picture ?", "describe"]
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def ov():
    return tiny_llava_onevision(0)


def batches(proc):
    return {"videos": dict(onevision_video_inputs(proc, PROMPTS[:2], ["video", "video"], n_frames=6)),
            "mixed": dict(onevision_video_inputs(proc, PROMPTS, ["video", "image", "video"], n_frames=4)),
            "one": dict(onevision_video_inputs(proc, PROMPTS[:1], n_frames=8))}


def clip_feats(model, x):
    "Each clip's pooled features (the model's own `get_video_features`), without the closing newline: [frames*s*s, D]."
    with torch.no_grad():
        po = model.model.get_video_features(x["pixel_values_videos"], vision_feature_layer=model.config.vision_feature_layer,
                                            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                            return_dict=True).pooler_output
    return [p[:-1] for p in po], po[0, -1]


@pytest.mark.parametrize("batch", ["videos", "mixed", "one"])
def test_keep_all_is_bit_exact_for_video(ov, batch):
    model, proc = ov
    x = batches(proc)[batch]
    with torch.no_grad():
        ref, gref = model(**x).logits, model.generate(**x, **GEN)
        with pruned(model, RandomPrune(keep=1.0)):
            assert torch.equal(model(**x).logits, ref)
            assert torch.equal(model.generate(**x, **GEN), gref)
            sel = last_selection(model)
    feats, _ = clip_feats(model, x)
    assert [len(s) for s in sel][-len(feats):] == [f.shape[0] for f in feats]   # videos after images, one per clip


@pytest.mark.parametrize("policy", [RandomPrune(keep=0.3, seed=1), UniformPrune(keep=0.5), ZSPAPrune(keep=0.25),
                                    ClsAttnPrune(keep=0.25), DivPrune(keep=0.25), TemporalPrune(keep=0.5)], ids=repr)
@pytest.mark.parametrize("batch", ["videos", "mixed"])
def test_lm_sees_exactly_the_kept_video_tokens(ov, policy, batch):
    model, proc = ov
    if isinstance(policy, TemporalPrune) and batch == "mixed": pytest.skip("TemporalPrune refuses still images")
    x = batches(proc)[batch]
    vid = model.config.video_token_id
    feats, newline = clip_feats(model, x)
    got = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(kw), with_kwargs=True)
    try:
        with pruned(model, policy) as ctx, torch.no_grad(): model(**x)
    finally: h.remove()
    sel = last_selection(model)[-len(feats):]
    for s, f in zip(sel, feats): assert len(s) == policy.budget(f.shape[0])       # one budget over the whole clip
    ids = ctx.last.kwargs["input_ids"]
    assert int((ids == vid).sum()) == sum(len(s) + 1 for s in sel)                # kept tokens + each clip's newline
    emb = got[0]["inputs_embeds"]
    want = torch.cat([torch.cat([f[s], newline[None]]) for f, s in zip(feats, sel)])
    assert torch.equal(emb[ids == vid], want.to(emb.dtype))
    # text untouched, no padding column left
    am, sam = x["attention_mask"], ctx.last.kwargs["attention_mask"]
    sam = torch.ones_like(ids) if sam is None else sam
    assert ids.shape[1] == int(sam.sum(1).max())
    special = (model.config.image_token_id, vid)
    for b in range(ids.shape[0]):
        keep_o = am[b].bool() & ~torch.isin(x["input_ids"][b], torch.tensor(special))
        keep_n = sam[b].bool() & ~torch.isin(ids[b], torch.tensor(special))
        assert torch.equal(x["input_ids"][b][keep_o], ids[b][keep_n])


def test_video_tokensets_have_a_frame_grid(ov):
    model, proc = ov
    x = batches(proc)["mixed"]
    rec = Recorder(UniformPrune(keep=0.5))
    with pruned(model, rec), torch.no_grad(): model(**x)
    seen = [[ts.grid_of(b) for b in range(ts.batch_size)] for ts in rec.calls]
    vc = model.config.vision_config
    s = -(-(vc.image_size // vc.patch_size) // 2)
    assert seen[0][1:] == [(4, s, s), (4, s, s)]                     # the image (tiled: no grid) first, then the clips


def test_video_saliency_is_attention_received_pooled_like_the_features(ov):
    "Independent reference: eager attentions of the SigLIP tower, averaged over heads and queries, pooled 2×2 bilinearly."
    model, proc = ov
    x = batches(proc)["one"]
    rec = Recorder(ClsAttnPrune(keep=0.5, saliency_layer=-1))     # needs the saliency of the last layer
    with pruned(model, rec), torch.no_grad(): model(**x)
    seen = [ts.saliency for ts in rec.calls]
    tower = model.model.vision_tower
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = tower(x["pixel_values_videos"][0], output_attentions=True).attentions[-1]   # [frames, H, L, L]
    finally: tower.config._attn_implementation = old
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    recv = att.double().mean(1).mean(1).view(-1, 1, side, side)                        # received, per frame
    ref = F.interpolate(recv, size=[-(-side // 2)] * 2, mode="bilinear").flatten()
    torch.testing.assert_close(seen[0].double(), ref, atol=1e-5, rtol=1e-4)


def test_temporal_prune_keeps_the_first_frame(ov):
    model, proc = ov
    x = batches(proc)["videos"]
    feats, _ = clip_feats(model, x)
    vc = model.config.vision_config
    s = -(-(vc.image_size // vc.patch_size) // 2)
    p = TemporalPrune(keep=0.5)
    with pruned(model, p), torch.no_grad(): model(**x)
    for sel, f in zip(last_selection(model), feats):
        grid = (f.shape[0] // (s * s), s, s)
        assert sel[:s * s].tolist() == list(range(s * s))
        d = temporal_dissimilarity(f.float(), grid)
        rest = sel[s * s:]
        dropped = torch.tensor(sorted(set(range(s * s, f.shape[0])) - set(rest.tolist())))
        assert d[rest].min() >= d[dropped].max() - 1e-6          # the kept later tokens changed most


def test_bad_video_inputs_are_named(ov):
    model, proc = ov
    x = batches(proc)["one"]
    x["pixel_values_videos"] = x["pixel_values_videos"][0]                     # [frames, C, H, W]: no clip axis
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="pixel_values_videos"): model(**x)
    x = batches(proc)["one"]
    x["pixel_values_videos"] = x["pixel_values_videos"].clone(); x["pixel_values_videos"].view(-1)[0] = float("nan")
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="`pixel_values_videos` contains NaN"): model(**x)
    x = batches(proc)["one"]
    with pruned(model, RandomPrune(keep=10_000)), pytest.raises(ValueError, match="visual tokens|keep"): model(**x)

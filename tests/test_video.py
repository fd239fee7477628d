"""Video (issue 14): Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 clips are pruned, not refused — one TokenSet per clip with grid
(t, h, w), one budget per clip, keep=1.0 bit-exact (logits and greedy generate), the LM sees exactly the kept video
tokens (every DeepStack level too) at their unpruned 3D positions, image + video batches; TemporalPrune (vLLM's EVS)."""
import pytest
import torch
import torch.nn.functional as F
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.testing.tiny import Recorder
from tokprune_nb.policies import RandomPrune, UniformPrune, ZSPAPrune, ClsAttnPrune
from tokprune_nb.temporal import TemporalPrune, temporal_dissimilarity
from tokprune_nb.core import TokenSet
from tokprune_nb.registry import family_named
from tokprune_nb.testing.video import qwen_vl_inputs

PROMPTS = ["what color is the cat ?", "how many dog are there in the picture ?", "describe"]
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen3.5"])
def fam(request):
    f = family_named(request.param)
    model, proc = f.tiny(0)
    return request.param, model, proc


def lm_calls(model, fn):
    "kwargs the language model received at every call of `fn()`."
    got = []
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: got.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad(): fn()
    finally: h.remove()
    return got


def batches(proc):
    return {"videos": dict(qwen_vl_inputs(proc, PROMPTS[:2], ["video", "video"], n_frames=5)),
            "mixed": dict(qwen_vl_inputs(proc, PROMPTS, ["video", "image", "video"], n_frames=4)),
            "one": dict(qwen_vl_inputs(proc, PROMPTS[:1], n_frames=6))}


def video_feats(model, x):
    with torch.no_grad():
        out = model.model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"], return_dict=True)
    m = model.model.visual.spatial_merge_size
    n = (x["video_grid_thw"].prod(-1) // (m * m)).tolist()
    po = out.pooler_output
    return list(po.split(n) if isinstance(po, torch.Tensor) else po), out


# ---- keep=1.0: bit-exact -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["videos", "mixed", "one"])
def test_keep_all_is_bit_exact_for_video(fam, batch):
    name, model, proc = fam
    x = batches(proc)[batch]
    with torch.no_grad():
        ref = model(**x).logits
        ref_gen = model.generate(**x, **GEN)
    with pruned(model, RandomPrune(keep=1.0)):
        with torch.no_grad():
            got = model(**x).logits
            got_gen = model.generate(**x, **GEN)
        sel = last_selection(model)
    assert torch.equal(got, ref)
    assert torch.equal(got_gen, ref_gen)
    m = model.model.visual.spatial_merge_size
    n_vid = (x["video_grid_thw"].prod(-1) // (m * m)).tolist()
    assert [len(s) for s in sel][-len(n_vid):] == n_vid        # videos come after the images, one selection per clip


# ---- keep<1: exactly the kept video tokens, at their unpruned positions --------------------------------------------
@pytest.mark.parametrize("policy", [RandomPrune(keep=0.3, seed=1), UniformPrune(keep=0.5), ZSPAPrune(keep=0.4),
                                    ClsAttnPrune(keep=0.5), TemporalPrune(keep=0.5)], ids=repr)
@pytest.mark.parametrize("batch", ["videos", "mixed"])
def test_lm_sees_exactly_the_kept_video_tokens_at_their_positions(fam, policy, batch):
    name, model, proc = fam
    x = batches(proc)[batch]
    if isinstance(policy, TemporalPrune) and batch == "mixed": pytest.skip("TemporalPrune refuses still images (tested below)")
    cfg = model.config
    feats, full = video_feats(model, x)
    with torch.no_grad():
        pos_full, _ = model.model.get_rope_index(
            x["input_ids"], x["mm_token_type_ids"], x.get("image_grid_thw"), x["video_grid_thw"],
            attention_mask=x["attention_mask"], **({"second_per_grid_ts": x["second_per_grid_ts"]} if "second_per_grid_ts" in x else {}))
    with pruned(model, policy) as ctx:
        kw = lm_calls(model, lambda: model(**x))[0]
        sel = last_selection(model)
    prep = ctx.last
    vsel = sel[-len(feats):]
    t_steps = x["video_grid_thw"][:, 0].tolist()
    for s, f in zip(vsel, feats): assert len(s) == policy.budget(f.shape[0])     # one budget over the whole clip
    ids = prep.kwargs["input_ids"]
    assert int((ids == cfg.video_token_id).sum()) == sum(len(s) for s in vsel)
    # the video features handed over are the clip's own features at the kept indices, in order
    vout = prep.kwargs["mm_encoder_outputs"]["video"]
    for got, f, s in zip(vout.pooler_output, feats, vsel): assert torch.equal(got, f[s])
    if name == "qwen3-vl":
        for j, lvl in enumerate(vout.deepstack_features):
            for got, i, s in zip(lvl, range(len(vsel)), vsel): assert torch.equal(got, full.deepstack_features[j][i][s])
    # what the LM receives at the video positions: exactly those features
    emb = kw["inputs_embeds"]
    assert torch.equal(emb[ids == cfg.video_token_id], torch.cat([f[s] for f, s in zip(feats, vsel)]).to(emb.dtype))
    # positions: each kept token keeps its unpruned 3D position (temporal component included)
    pos = kw["position_ids"]; pmap = prep.position_map
    for b in range(ids.shape[0]):
        real = pmap[b] >= 0
        assert torch.equal(pos[:, b, real], pos_full[:, b, pmap[b][real]])
    vcols = [pmap[b][(ids[b] == cfg.video_token_id)] for b in range(ids.shape[0])]
    for b, cols in enumerate(vcols):
        if len(cols): assert len(set(pos_full[0, b, cols].tolist())) > 1 or max(t_steps) == 1  # several temporal steps kept


def test_video_tokensets_have_a_temporal_grid(fam):
    name, model, proc = fam
    x = batches(proc)["mixed"]
    rec = Recorder(UniformPrune(keep=0.5))
    with pruned(model, rec), torch.no_grad(): model(**x)
    seen = [[ts.grid_of(b) for b in range(ts.batch_size)] for ts in rec.calls]
    m = model.model.visual.spatial_merge_size
    want_img = [(int(h) // m, int(w) // m) for _, h, w in x["image_grid_thw"].tolist()]
    want_vid = [(int(t), int(h) // m, int(w) // m) for t, h, w in x["video_grid_thw"].tolist()]
    assert seen == [want_img + want_vid]


def test_generate_with_pruned_video_continues_after_the_original_positions(fam):
    name, model, proc = fam
    x = batches(proc)["videos"]
    with pruned(model, RandomPrune(keep=0.4, seed=0)):
        calls = lm_calls(model, lambda: model.generate(**x, max_new_tokens=3, do_sample=False))
    with torch.no_grad():
        ref_calls = lm_calls(model, lambda: model.generate(**x, max_new_tokens=3, do_sample=False))
    # decoding steps: the new tokens get the same 3D positions as in the unpruned run
    for c, r in zip(calls[1:], ref_calls[1:]):
        assert torch.equal(c["position_ids"][-3:], r["position_ids"][-3:])


def test_missing_video_grid_is_refused(fam):
    name, model, proc = fam
    x = batches(proc)["one"]; x.pop("video_grid_thw")
    with pruned(model, RandomPrune(keep=0.5)), pytest.raises(ValueError, match="video_grid_thw"): model(**x)


def test_keep_below_one_token_per_clip_is_refused_before_compute(fam):
    name, model, proc = fam
    x = batches(proc)["one"]
    with pruned(model, RandomPrune(keep=10_000)), pytest.raises(ValueError, match="video|visual tokens"): model(**x)


# ---- TemporalPrune -----------------------------------------------------------------------------------------------
def evs_reference(feats, grid, k):
    "Loop-by-loop EVS: the first step always, then the k - h*w tokens least similar to the same cell one step back."
    t, h, w = grid
    assert k >= h * w
    scores = []
    for f in range(1, t):
        for c in range(h * w):
            a, b = feats[f * h * w + c].double(), feats[(f - 1) * h * w + c].double()
            scores.append((-(a @ b / (a.norm() * b.norm())).item(), f * h * w + c))
    rest = sorted(scores, key=lambda s: (-s[0], s[1]))[:k - h * w]
    return sorted(list(range(h * w)) + [i for _, i in rest])


@pytest.mark.parametrize("keep", [0.34, 0.5, 0.8])
def test_temporal_prune_keeps_frame_zero_and_matches_reference(fam, keep):
    name, model, proc = fam
    x = batches(proc)["videos"]
    feats, _ = video_feats(model, x)
    m = model.model.visual.spatial_merge_size
    grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in x["video_grid_thw"].tolist()]
    p = TemporalPrune(keep=keep)
    with pruned(model, p):
        with torch.no_grad(): model(**x)
        sel = last_selection(model)
    for s, f, g in zip(sel, feats, grids):
        hw = g[1] * g[2]
        assert s[:hw].tolist() == list(range(hw))                          # the whole first step is kept
        assert s.tolist() == evs_reference(f.float(), g, p.budget(f.shape[0]))


def test_temporal_prune_on_static_video_keeps_the_changed_cells():
    torch.manual_seed(0)
    t, h, w, D = 4, 3, 3, 16
    base = torch.randn(h * w, D)
    frames = [base]
    for c in (4, 0, 8):                         # each step changes one cell of the previous step
        frames.append(frames[-1].clone()); frames[-1][c] = torch.randn(D)
    ts = TokenSet(feats=torch.cat(frames), grid=(t, h, w))
    got = TemporalPrune(keep=h * w + 3)(ts).tolist()
    assert got == list(range(h * w)) + [9 + 4, 18 + 0, 27 + 8]
    d = temporal_dissimilarity(ts.feats, (t, h, w))
    assert torch.isinf(d[:h * w]).all() and d[h * w:].min() >= -1e-6


def test_temporal_prune_refuses_still_images(fam):
    name, model, proc = fam
    x = batches(proc)["mixed"]
    with pruned(model, TemporalPrune(keep=0.5)), pytest.raises(ValueError, match="video-only"): model(**x)
    # refused before the vision tower runs: nothing is encoded for inputs the policy cannot prune
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pruned(model, TemporalPrune(keep=0.5)), pytest.raises(ValueError, match="video-only.*image"): model(**x)
    finally: hook.remove()
    assert calls == []
    with pytest.raises(ValueError, match="3-D"): TemporalPrune(keep=0.5)(TokenSet(feats=torch.randn(6, 4), grid=(2, 3)))

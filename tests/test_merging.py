"""Merging primitives: VisionZip against a reference written from the published algorithm, merge-back properties."""
import pytest
import torch
from tokprune_nb.merging import Reduction, merge_back, visionzip_reduce, VisionZip, ToMePrune
from tokprune_nb.policies import RandomPrune


def official_visionzip(hidden, attn_cls, metric, dominant_num, contextual_num):
    """The published algorithm (dvlab-research/VisionZip, visionzip/clip_encoder.py), batched as there, re-written here
    as a reference: token 0 is CLS and always dominant; `dominant_num` more by CLS attention; the rest merged into
    `contextual_num` uniformly strided targets by key cosine; contextual = target + mean(assigned)."""
    B, L, D = hidden.shape
    top = attn_cls.topk(dominant_num, dim=1).indices + 1                      # attention of CLS to patches 1..L-1
    all_idx = torch.cat([torch.zeros(B, 1, dtype=top.dtype), top], 1)
    mask = torch.ones(B, L, dtype=torch.bool).scatter_(1, all_idx, False)
    dom = hidden.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, D)
    met = metric[mask].view(B, L - dominant_num - 1, metric.shape[2])
    hid = hidden.masked_select(mask.unsqueeze(-1)).view(B, L - dominant_num - 1, D)
    met = met / met.norm(dim=-1, keepdim=True)
    step = max(1, met.shape[1] // contextual_num)
    tgt = torch.arange(0, met.shape[1], step)[:contextual_num]
    others = ~torch.isin(torch.arange(met.shape[1]), tgt)
    sim = torch.bmm(met[:, others], met[:, tgt].transpose(1, 2))
    onehot = torch.zeros(B, int(others.sum()), contextual_num).scatter_(2, sim.argmax(2).unsqueeze(-1), 1)
    counts = onehot.sum(1).clamp(min=1).unsqueeze(-1)
    agg = torch.bmm(onehot.transpose(1, 2), hid[:, others]) / counts
    ctx = hid[:, tgt] + agg
    # the slots: dominant (original index) and the targets' original indices
    rest_idx = torch.stack([torch.nonzero(mask[b]).flatten() for b in range(B)])
    return all_idx.sort(1).values, dom, rest_idx[:, tgt], ctx    # masked_select keeps index order


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("d,c", [(53, 10), (107, 20), (161, 30), (5, 1)])
def test_visionzip_matches_the_published_algorithm(seed, d, c):
    g = torch.Generator().manual_seed(seed)
    L, D, Dk = 577, 64, 16                                       # CLS + 24x24 patches, as LLaVA-1.5
    hidden, metric = torch.randn(1, L, D, generator=g), torch.randn(1, L, Dk, generator=g)
    attn = torch.rand(1, L - 1, generator=g)
    dom_idx, dom, tgt_idx, ctx = official_visionzip(hidden, attn, metric, d, c)
    sal = torch.cat([torch.tensor([float("inf")]), attn[0]])    # CLS always dominant, as in the official code
    slots, feats, size = visionzip_reduce(hidden[0], sal, metric[0], dominant=d + 1, contextual=c)
    want = {int(i): f for i, f in zip(dom_idx[0], dom[0])} | {int(i): f for i, f in zip(tgt_idx[0], ctx[0])}
    assert slots.tolist() == sorted(want)                       # the same tokens survive (dominant indices equal)
    for s, f in zip(slots.tolist(), feats): torch.testing.assert_close(f, want[s], atol=1e-5, rtol=1e-5)
    assert float(size.sum()) == L and torch.all(size >= 1)


def test_visionzip_keep_all_and_bad_budgets():
    h, s, k = torch.randn(10, 4), torch.rand(10), torch.randn(10, 3)
    slots, f, size = visionzip_reduce(h, s, k, 6, 4)
    assert torch.equal(slots, torch.arange(10)) and torch.equal(f, h)
    with pytest.raises(ValueError, match="dominant"): visionzip_reduce(h, s, k, 8, 4)
    with pytest.raises(ValueError, match="dominant"): visionzip_reduce(h, s, k, 0, 0)


def test_merge_back_properties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, N, D = 3, int(torch.randint(5, 40, (1,), generator=g)), 7
        x = torch.randn(B, N, D, generator=g)
        k = int(torch.randint(1, N, (1,), generator=g))
        kept = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
        mer, size = merge_back(x, kept)
        assert torch.equal(size.sum(1), torch.full((B,), float(N)))          # every token counted once
        for b in range(B):                                                   # batch == alone, bit-exact
            mb, sb = merge_back(x[b:b+1], kept[b:b+1])
            assert torch.equal(mb[0], mer[b]) and torch.equal(sb[0], size[b])
        assert not torch.equal(mer, torch.gather(x, 1, kept[..., None].expand(-1, -1, D)))   # merged differ from originals
    x = torch.randn(2, 6, 3)
    assert torch.equal(merge_back(x, torch.arange(6).expand(2, 6))[0], x)   # keep all: unchanged


def test_reduction_validates():
    with pytest.raises(TypeError, match="`index`"): Reduction(torch.tensor([0.0]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="`size`"): Reduction(torch.tensor([0, 1]), torch.zeros(2, 2), size=torch.ones(3))
    assert Reduction(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 4)).batched


def _vz_set(n, seed, d=8):
    from tokprune_nb.core import TokenSet
    g = torch.Generator().manual_seed(seed)
    return TokenSet(torch.randn(n, d, generator=g), saliency=torch.rand(n, generator=g),
                    vision_feats=torch.randn(n, 12, generator=g), keys=torch.randn(n, 4, generator=g))


def test_visionzip_policy_batch_equals_alone_and_validates():
    from tokprune_nb.core import TokenSet
    from tokprune_nb.merging import VisionZip
    sets = [_vz_set(n, s) for s, n in enumerate((64, 40, 64))]
    vz = VisionZip(0.25)
    batch = vz(TokenSet.stack(sets))
    for b, s in enumerate(sets):
        alone = vz(s); k = alone.index.numel()
        assert torch.equal(batch.index[b, :k], alone.index) and torch.equal(batch.feats[b, :k], alone.feats)
        assert (batch.index[b, k:] == -1).all()
    assert vz.split(16) == (14, 2) and VisionZip(20, dominant=15, contextual=5).budget(64) == 20
    with pytest.raises(ValueError, match="`dominant`"): VisionZip(0.5, dominant=-1)
    with pytest.raises(ValueError, match="`dominant`"): VisionZip(0.5, dominant=1.5)
    with pytest.raises(ValueError, match="more than"): VisionZip(8, dominant=60, contextual=10).budget(64)
    with pytest.raises(ValueError, match="`keys`"): vz(TokenSet(torch.randn(10, 4), saliency=torch.rand(10), vision_feats=torch.randn(10, 3)))


def test_tokenset_merging_fields_validated():
    from tokprune_nb.core import TokenSet
    with pytest.raises(ValueError, match="`keys`"): TokenSet(torch.randn(10, 4), keys=torch.randn(9, 2))
    with pytest.raises(ValueError, match="`vision_feats`"): TokenSet(torch.randn(10, 4), vision_feats=torch.randn(10, 2) * float("nan"))


@pytest.mark.parametrize("builder", ["tiny_llava", "mid"])
def test_visionzip_end_to_end_on_llava(builder):
    """Through pruned(...): the LM gets k tokens per image; dominant ones are the unpruned features, merged ones are the
    projector applied to VisionZip's merge of the layer's hidden states (a reference recomputed here)."""
    from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs
    from tokprune_nb.inject import pruned, last_selection
    from tokprune_nb.merging import VisionZip
    from tokprune_nb.adapters.llava import tower_saliency, tower_keys
    model, proc = tiny_llava(image_size=56, patch_size=7) if builder == "mid" else tiny_llava()   # 64 or 16 tokens
    x = tiny_inputs(proc, ["what is in the image ?", "how many dog are there ?"])
    got = []
    h = model.model.register_forward_pre_hook(lambda m, a, kw: got.append(kw["mm_encoder_outputs"]["image"].pooler_output), with_kwargs=True)
    with torch.no_grad(), pruned(model, VisionZip(0.5)): model(**x)
    h.remove()
    sel = last_selection(model)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", output_hidden_states=True, return_dict=True)
        hs, full = out.hidden_states, out.pooler_output
        tower = model.model.vision_tower
        sal, keys = tower_saliency(tower, hs, -2, "default"), tower_keys(tower, hs, -2, "default")
        for b in range(2):
            n = full[b].shape[0]; k = n // 2
            slots, f, size = visionzip_reduce(hs[-2][b, 1:], sal[b], keys[b], *VisionZip(0.5).split(k))
            assert torch.equal(sel[b], slots)
            want = torch.where((size > 1)[:, None], model.model.multi_modal_projector(f), full[b][slots])
            torch.testing.assert_close(got[0][b], want, atol=1e-5, rtol=1e-5)
            merged = size > 1
            assert merged.any()
            for row in got[0][b][merged]:                    # a merged token is none of the original tokens
                assert not any(torch.allclose(row, o, atol=1e-6) for o in full[b])


def _lm_image_feats(model, policy, x, **kw):
    from tokprune_nb.inject import pruned, last_selection
    got = []
    h = model.model.register_forward_pre_hook(lambda m, a, k: got.append(k["mm_encoder_outputs"]["image"].pooler_output), with_kwargs=True)
    try:
        with torch.no_grad(), pruned(model, policy, **kw): model(**x)
    finally: h.remove()
    return list(got[0]), last_selection(model)


def test_visionzip_in_llm_space_on_qwen():
    """A family without pre-projector features (Qwen2.5-VL: the 2x2 merger) runs VisionZip on the LLM-space tokens:
    dominance by attention received, contextual targets by the cosine of those tokens; checked against a recomputation."""
    from tokprune_nb.testing.tiny import tiny_qwen2_5_vl, tiny_qwen_inputs
    from tokprune_nb.merging import VisionZip
    from tokprune_nb.adapters.qwen2_5_vl import qwen_vision_tokens
    model, proc = tiny_qwen2_5_vl()
    x = tiny_qwen_inputs(proc, ["what is in the image ?", "describe the image"], size=[224, 168])
    got, sel = _lm_image_feats(model, VisionZip(0.5), x)
    with torch.no_grad():
        feats, _, sal = qwen_vision_tokens(model, x["pixel_values"], x["image_grid_thw"], saliency_layer=-2)
    for b in range(2):
        k = VisionZip(0.5).budget(feats[b].shape[0])
        slots, f, size = visionzip_reduce(feats[b].float(), sal[b].float(), feats[b].float(), *VisionZip(0.5).split(k))
        assert torch.equal(sel[b], slots) and (size > 1).any()
        want = torch.where((size > 1)[:, None], f.to(feats[b].dtype), feats[b][slots])
        assert torch.equal(got[b], want)


def test_merge_pruned_end_to_end_on_llava():
    """`merge_pruned=True`: the same tokens as the plain policy; merged slots are `merge_back` of the LLM-space tokens,
    the others bit-identical."""
    from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs
    from tokprune_nb.policies import DivPrune, RelevancePrune
    model, proc = tiny_llava(image_size=56, patch_size=7)
    x = tiny_inputs(proc, ["what is in the image ?", "how many dog are there ?"])
    full, _ = _lm_image_feats(model, DivPrune(1.0), x)
    for pol in (DivPrune(0.25, merge_pruned=True), RelevancePrune(0.25, merge_pruned=True)):
        got, sel = _lm_image_feats(model, pol, x)
        _, plain = _lm_image_feats(model, type(pol)(0.25), x)
        for b in range(2):
            assert torch.equal(sel[b], plain[b])
            mer, size = merge_back(full[b][None].float(), sel[b][None])
            want = torch.where((size[0] > 1)[:, None], mer[0], full[b][sel[b]])
            assert torch.equal(got[b], want) and (size > 1).any() and float(size.sum()) == full[b].shape[0]


def test_policies_that_need_merging_evidence_are_refused_where_missing():
    "A policy that *needs* pre-projector features is refused up front where the family cannot give them."
    from tokprune_nb.testing.tiny import tiny_qwen2_5_vl
    from tokprune_nb.inject import pruned
    from tokprune_nb.policies import Policy
    class NeedsVision(Policy):
        @property
        def needs(self): return frozenset({"vision_feats"})
    model, _ = tiny_qwen2_5_vl()
    with pytest.raises(ValueError, match="pre-projector"):
        with pruned(model, NeedsVision(0.5)): pass


def test_vision_space_reduction_without_vision_feats_is_named():
    from tokprune_nb.adapters.base import run_policy
    from tokprune_nb.core import TokenSet
    class Bad:
        keep, needs = 0.5, frozenset()
        def budget(self, n): return n // 2
        def __call__(self, ts): return Reduction(torch.arange(4), torch.randn(4, 3), torch.full((4,), 2.0), space="vision")
    with pytest.raises(ValueError, match="Bad returned vision-space"):
        run_policy(Bad(), [TokenSet(torch.randn(8, 5))], [])


@pytest.mark.parametrize("builder", ["llava", "qwen2.5-vl"])
def test_flops_three_way_for_merging_policies(builder):
    """fvcore = FlopCounterMode = formula for a merging run (a batch of three); merge-back's work is counted as selection."""
    import warnings
    from tokprune_nb.measure.flops import count_flops, analytic_prefill_flops
    from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs, tiny_qwen2_5_vl, tiny_qwen_inputs
    from tokprune_nb.policies import DivPrune
    from tokprune_nb.merging import VisionZip
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    if builder == "llava": m, p = tiny_llava(); inp = tiny_inputs(p, ["what color is the ball", "describe", "how many red dog are there ?"])
    else: m, p = tiny_qwen2_5_vl(); inp = tiny_qwen_inputs(p, ["what color is the cat ?", "describe the image", "how many ?"])
    plain = count_flops(m, inp, DivPrune(0.25))
    for pol in (VisionZip(0.25), DivPrune(0.25, merge_pruned=True)):
        fv, tc = count_flops(m, inp, pol), count_flops(m, inp, pol, counter="torch")
        assert fv.unsupported == {}
        da, db = fv.as_dict(), tc.as_dict(); da.pop("counter"); db.pop("counter")
        assert da == db
        assert fv.batch == 3 and fv.llm == analytic_prefill_flops(m.config, fv.seq_len, batch=3)
        assert fv.seq_len == plain.seq_len and fv.selection > 0
    assert count_flops(m, inp, DivPrune(0.25, merge_pruned=True)).selection > plain.selection   # the merge is counted


def _tome_reference(x, k):
    "ToMe's bipartite soft matching written plainly (lists, one pair at a time), rounds until k tokens remain."
    toks = [(i, x[i].double(), 1.0) for i in range(x.shape[0])]            # (slot, feature, size) in slot order
    while len(toks) > k:
        A, B = toks[0::2], toks[1::2]
        r = min(len(toks) - k, len(A), len(B))
        cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
        best = []
        for ai, (_, fa, _) in enumerate(A):
            sims = [cos(fa, fb) for _, fb, _ in B]
            j = max(range(len(B)), key=lambda t: (sims[t], -t))            # first maximum
            best.append((sims[j], ai, j))
        order = sorted(range(len(A)), key=lambda ai: (-best[ai][0], ai))   # stable, descending
        merged = {ai for ai in order[:r]}
        Bn = [list(t) for t in B]
        for ai in order[:r]:
            _, _, j = best[ai]; sa, fa, wa = A[ai]
            sb, fb, wb = Bn[j]
            Bn[j] = [sb, (fb * wb + fa * wa) / (wb + wa), wb + wa]
        toks = sorted([A[ai] for ai in range(len(A)) if ai not in merged] + [tuple(t) for t in Bn], key=lambda t: t[0])
    return torch.tensor([t[0] for t in toks]), torch.stack([t[1] for t in toks]).float(), torch.tensor([t[2] for t in toks])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,k", [(16, 4), (17, 5), (40, 13), (9, 8)])
def test_tome_matches_a_plain_reference_and_batches(seed, n, k):
    from tokprune_nb.merging import tome_reduce, ToMePrune
    from tokprune_nb.core import TokenSet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    slots, f, size = tome_reduce(x, k)
    rs, rf, rsz = _tome_reference(x, k)
    assert torch.equal(slots, rs) and torch.equal(size, rsz.float())
    torch.testing.assert_close(f, rf, atol=1e-5, rtol=1e-5)
    assert float(size.sum()) == n
    sets = [TokenSet(x), TokenSet(torch.randn(n + 3, 6, generator=g))]
    batch = ToMePrune(k)(TokenSet.stack(sets))
    for b, s in enumerate(sets):
        alone = ToMePrune(k)(s)
        assert torch.equal(batch.index[b, :k], alone.index) and torch.equal(batch.feats[b, :k], alone.feats)


def test_visionzip_per_tile_on_llava_next():
    """LLaVA-NeXT's adapter names each token's crop (`tiles`: 0 = base view); VisionZip shares the budget out over the
    crops in proportion to their tokens and merges within each crop; per_tile=False is one VisionZip over the image."""
    from tokprune_nb.testing.tiny import tiny_llava_next, tiny_inputs
    from tokprune_nb.inject import pruned, last_selection
    from tokprune_nb.merging import VisionZip, shares
    from tokprune_nb.policies import RandomPrune
    from tokprune_nb.testing.tiny import Recorder
    model, proc = tiny_llava_next()
    x = tiny_inputs(proc, ["what is in the image ?", "how many dog are there ?"], sizes=[(56, 56), (28, 56)])
    rec = Recorder(RandomPrune(keep=1.0))                 # keeps everything, records the TokenSets
    with torch.no_grad(), pruned(model, rec): model(**x)
    seen = [s for ts in rec.calls for s in (ts.split() if ts.batched else [ts])]
    counts = [torch.bincount(s.tiles).tolist() for s in seen]
    assert counts[0][0] == 16 and len(counts[0]) == 5 and len(counts[1]) == 3   # 4x4 base + 2x2 / 1x2 crops
    for pt in (True, False):
        with torch.no_grad(), pruned(model, VisionZip(0.5, per_tile=pt)): model(**x)
        sel = last_selection(model)
        for s, c, kept in zip(seen, counts, sel):
            k = s.n_tokens // 2
            per = torch.bincount(s.tiles[kept], minlength=len(c)).tolist()
            assert len(kept) == k
            if pt: assert per == shares(k, c)


@pytest.mark.parametrize("make", [lambda: VisionZip(0.3), lambda: VisionZip(0.3, per_tile=False), lambda: ToMePrune(0.3),
                                  lambda: RandomPrune(0.3, seed=1, merge_pruned=True)],
                         ids=["visionzip-tiles", "visionzip", "tome", "random+merge"])
def test_groups_reproduce_the_merged_features(make):
    """Every merging result carries its groups (`assign`, `weight`): Σ weight·token over a slot's group is the slot's
    feature, in the result's space (VisionZip: the pre-projector features), for one image and for a batch of three
    of different sizes (padding: -1 / 0); the kept slots are in their own group."""
    from tokprune_nb.core import TokenSet
    torch.manual_seed(0)
    mk = lambda n: TokenSet(feats=torch.randn(n, 8), saliency=torch.rand(n), vision_feats=torch.randn(n, 6),
                            keys=torch.randn(n, 4), tiles=torch.arange(n) * 3 // n)
    sets = [mk(n) for n in (36, 24, 30)]
    pol = make()
    for ts, many in ((sets[0], False), (TokenSet.stack(sets), True)):
        red = pol(ts)
        assert isinstance(red, Reduction) and red.assign is not None and red.batched == many
        for i, s in enumerate(sets if many else sets[:1]):
            n = s.n_tokens
            idx, f = (red.index[i], red.feats[i]) if many else (red.index, red.feats)
            a, w = (red.assign[i], red.weight[i]) if many else (red.assign, red.weight)
            k = int((idx >= 0).sum()); idx, f = idx[:k], f[:k]
            if many: assert (a[n:] == -1).all() and (w[n:] == 0).all()
            a, w = a[:n], w[:n]
            src = s.vision_feats if red.space == "vision" else s.feats
            u = a >= 0
            got = torch.zeros(k, src.shape[-1]).index_add_(0, a[u], src[u] * w[u][:, None])
            torch.testing.assert_close(got, f.float(), atol=1e-5, rtol=1e-4)
            assert torch.equal(a[idx], torch.arange(k))                 # a kept token is in its own slot's group


def test_merging_policies_return_ordinary_tensors():
    "VisionZip and ToMe reduce under inference mode; their Reductions hold ordinary tensors (the model may write them)."
    from tokprune_nb import TokenSet
    g = torch.Generator().manual_seed(0)
    ts = TokenSet(torch.randn(2, 30, 8, generator=g), saliency=torch.rand(2, 30, generator=g), keys=torch.randn(2, 30, 4, generator=g))
    for p in (VisionZip(0.3), ToMePrune(0.3)):
        for t in (ts, ts.split()[0]):
            r = p(t)
            assert isinstance(r, Reduction)
            for f in (r.index, r.feats, r.size, r.assign, r.weight): assert not f.is_inference(), f"{p!r}"
            r.feats.mul_(1.0)

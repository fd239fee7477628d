"""Property and bad-input tests for every selection policy (tokprune_nb.policies)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from tokprune_nb import TokenSet
from tokprune_nb.policies import (ATP, ClsAttnPrune, DivPrune, DPPPrune, KMeansPrune, RandomPrune, RelevancePrune,
                                  UniformPrune, ZSPAPrune, budget, grid_subsample)

GRIDS = [(2, 3), (4, 4), (3, 5), (6, 6)]


def make_ts(B, grid, D=8, T=3, C=4, seed=0, batched=True):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    lead = (B,) if batched else ()
    return TokenSet(torch.randn(*lead, N, D, generator=g), grid=grid,
                    saliency=torch.rand(*lead, N, generator=g),
                    prompt=torch.randn(*lead, T, D, generator=g),
                    clip_feats=torch.randn(*lead, N, C, generator=g), clip_text=torch.randn(*lead, C, generator=g))


def all_policies(keep):
    return [ZSPAPrune(keep), ZSPAPrune(keep, diversity='maxmin'), ZSPAPrune(keep, relevance_frac=0.3, reduce='max'),
            ATP(keep), ATP(keep, alpha=0.0), ATP(keep, alpha=1.0, sign=-1), ATP(keep, relevance='prompt'),
            RandomPrune(keep, seed=3), UniformPrune(keep), ClsAttnPrune(keep), RelevancePrune(keep),
            KMeansPrune(keep), DivPrune(keep), DPPPrune(keep), DPPPrune(keep, theta=0.0)]


keeps = st.one_of(st.floats(min_value=0.01, max_value=1.0), st.integers(min_value=1, max_value=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keep=keeps, grid=st.sampled_from(GRIDS), B=st.integers(1, 3), seed=st.integers(0, 1000))
def test_policy_properties(keep, grid, B, seed):
    """Exact count, unique, sorted, in range; repeatable; batch equals per-image."""
    ts = make_ts(B, grid, seed=seed)
    N = ts.n_tokens
    for pol in all_policies(keep):
        k = budget(keep, N)
        out = pol(ts)
        assert out.dtype == torch.long and out.shape == (B, k), (pol, out.shape)
        assert bool((out[:, 1:] > out[:, :-1]).all()), f"{pol}: not sorted/unique"
        assert int(out.min()) >= 0 and int(out.max()) < N
        assert torch.equal(out, pol(ts)), f"{pol}: not repeatable"
        for b, single in enumerate(ts.split()):
            assert torch.equal(out[b], pol(single)), f"{pol}: batch row {b} differs from the single-image call"


def test_keep_semantics():
    ts = make_ts(1, (4, 4), batched=False)
    assert ZSPAPrune(1.0)(ts).tolist() == list(range(16))   # float 1.0: all tokens
    assert ZSPAPrune(1)(ts).numel() == 1                      # int 1: one token
    assert budget(0.111, 576) == 64 and budget(0.25, 576) == 144


def test_zspaprune_edge_cases_equal_baselines():
    ts = make_ts(2, (6, 6), seed=5)
    for keep in (0.1, 0.25, 0.5, 7):
        assert torch.equal(ZSPAPrune(keep, relevance_frac=1.0)(ts), RelevancePrune(keep)(ts))
        assert torch.equal(ZSPAPrune(keep, relevance_frac=0.0)(ts), KMeansPrune(keep)(ts))
        assert torch.equal(ZSPAPrune(keep, relevance_frac=0.0, diversity='maxmin')(ts), DivPrune(keep)(ts))


def test_zspaprune_core_is_top_relevance():
    ts = make_ts(1, (6, 6), seed=2, batched=False)
    pol = ZSPAPrune(10, relevance_frac=0.6)
    n_core, n_div = pol.split(10)
    assert (n_core, n_div) == (6, 4)
    core = set(RelevancePrune(n_core)(ts).tolist())
    assert core <= set(pol(ts).tolist())


def test_atp_alpha_extremes():
    ts = make_ts(1, (4, 4), seed=1, batched=False)
    assert torch.equal(ATP(5, alpha=0.0)(ts), ClsAttnPrune(5)(ts))
    sim = torch.nn.functional.cosine_similarity(ts.clip_feats, ts.clip_text[None], dim=-1)
    assert set(ATP(5, alpha=1.0)(ts).tolist()) == set(sim.topk(5).indices.tolist())
    assert set(ATP(5, alpha=1.0, sign=-1)(ts).tolist()) == set((-sim).topk(5).indices.tolist())


def test_padded_batch_matches_per_image():
    a, b = make_ts(1, (4, 4), seed=1, batched=False), make_ts(1, (3, 3), seed=2, batched=False)
    pb = TokenSet.stack([a, b])
    for pol in all_policies(0.5):
        out = pol(pb)
        ka, kb = pol.budget(16), pol.budget(9)
        assert out.shape == (2, ka)
        assert torch.equal(out[0], pol(TokenSet(a.feats, saliency=a.saliency, prompt=a.prompt, clip_feats=a.clip_feats,
                                                clip_text=a.clip_text)))
        assert torch.equal(out[1, :kb], pol(TokenSet(b.feats, saliency=b.saliency, prompt=b.prompt,
                                                      clip_feats=b.clip_feats, clip_text=b.clip_text)))
        assert out[1, kb:].tolist() == [-1] * (ka - kb)


def test_duplicate_tokens_exact_count():
    """k >= number of distinct points: still k distinct indices."""
    feats = torch.ones(12, 4)
    ts = TokenSet(feats, grid=(3, 4), prompt=torch.ones(2, 4))
    for pol in (ZSPAPrune(8), KMeansPrune(12), DivPrune(8), DPPPrune(8), ZSPAPrune(8, diversity='maxmin')):
        out = pol(ts)
        assert out.numel() == 8 or out.numel() == 12
        assert len(set(out.tolist())) == out.numel()


def test_grid_subsample_is_regular():
    idx = grid_subsample(24, 24, 144)
    rows, cols = (idx // 24).unique(), (idx % 24).unique()
    assert len(rows) == 12 and len(cols) == 12 and idx.numel() == 144
    for h, w, k in [(5, 7, 11), (24, 24, 64), (1, 9, 3), (4, 4, 16)]:
        assert len(set(grid_subsample(h, w, k).tolist())) == k


@pytest.mark.parametrize('bad, match', [
    (lambda: ZSPAPrune(0.0), r'`keep` as a fraction must be in \(0, 1\]'),
    (lambda: ZSPAPrune(1.5), r'`keep` as a fraction'),
    (lambda: ZSPAPrune(-3), r'`keep` as a count must be >= 1'),
    (lambda: ZSPAPrune('half'), r'`keep` must be a float'),
    (lambda: ZSPAPrune(True), r'`keep` must be a float'),
    (lambda: ZSPAPrune(0.5, relevance_frac=1.2), r'`relevance_frac` must be in \[0, 1\]'),
    (lambda: ZSPAPrune(0.5, diversity='dpp'), r'`diversity` must be one of'),
    (lambda: ZSPAPrune(0.5, reduce='sum'), r'`reduce` must be one of'),
    (lambda: ZSPAPrune(0.5, iters=0), r'`iters` must be an int >= 1'),
    (lambda: ATP(0.5, alpha=1.1), r'`alpha` must be in \[0, 1\]'),
    (lambda: ATP(0.5, alpha=float('nan')), r'`alpha` must be in \[0, 1\]'),
    (lambda: ATP(0.5, sign=0), r'`sign` must be 1 or -1'),
    (lambda: ATP(0.5, relevance='text'), r'`relevance` must be one of'),
    (lambda: ATP(0.5, saliency_layer=1.5), r'`saliency_layer` must be an int'),
    (lambda: DPPPrune(0.5, theta=-1), r'`theta` must be a finite number >= 0'),
    (lambda: DivPrune(0.5, metric='l1'), r'`metric` must be one of'),
])
def test_bad_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_missing_evidence_is_named():
    ts = TokenSet(torch.randn(9, 4), grid=(3, 3))
    for pol, field in [(ZSPAPrune(3), 'prompt'), (RelevancePrune(3), 'prompt'), (DPPPrune(3), 'prompt'),
                       (ClsAttnPrune(3), 'saliency'), (ATP(3), 'clip_feats'), (ATP(3, alpha=0.0), 'saliency'),
                       (ATP(3, relevance='prompt', alpha=1.0), 'prompt')]:
        with pytest.raises(ValueError, match=f'needs `{field}`'):
            pol(ts)
    # policies that need nothing run on bare features
    for pol in (RandomPrune(3), UniformPrune(3), KMeansPrune(3), DivPrune(3), DPPPrune(3, theta=0), ZSPAPrune(3, relevance_frac=0)):
        assert pol(ts).numel() == 3
    with pytest.raises(ValueError, match='more than the image'):
        KMeansPrune(10)(ts)
    with pytest.raises(TypeError, match='must be a TokenSet'):
        ZSPAPrune(3)(torch.randn(9, 4))


def test_tokenset_validation():
    with pytest.raises(ValueError, match='NaN or inf'):
        TokenSet(torch.tensor([[1.0, float('nan')]]))
    with pytest.raises(TypeError, match='floating-point'):
        TokenSet(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='`saliency` must have'):
        TokenSet(torch.randn(2, 5, 4), saliency=torch.rand(5))
    with pytest.raises(ValueError, match='`clip_feats`.*same CLIP space'):
        TokenSet(torch.randn(5, 4), clip_feats=torch.randn(5, 3), clip_text=torch.randn(2))
    with pytest.raises(ValueError, match='`prompt_mask` was given without `prompt`'):
        TokenSet(torch.randn(5, 4), prompt_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match='`grid`'):
        TokenSet(torch.randn(5, 4), grid=(2, 2))
    with pytest.raises(TypeError, match='torch.bool'):
        TokenSet(torch.randn(2, 5, 4), mask=torch.ones(2, 5))


def test_dpp_prefers_relevant_and_diverse():
    # two identical relevant tokens and one distinct irrelevant: a DPP of size 2 never takes both duplicates
    feats = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0.7, 0.7]])
    ts = TokenSet(feats, prompt=torch.tensor([[1., 0.]]))
    out = DPPPrune(2, theta=2.0)(ts).tolist()
    assert not (0 in out and 1 in out)
    assert 0 in out or 1 in out  # the relevant direction is represented


def test_policies_run_on_the_tensors_device_and_dtype():
    ts = make_ts(2, (4, 4))
    half = TokenSet(ts.feats.to(torch.bfloat16), grid=ts.grid, saliency=ts.saliency, prompt=ts.prompt.to(torch.bfloat16))
    for pol in (ZSPAPrune(0.5), DivPrune(0.5), DPPPrune(0.5), ClsAttnPrune(0.5)):
        out = pol(half)
        assert out.shape == (2, 8) and out.device == ts.feats.device

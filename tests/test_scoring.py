"""Edge cases and bad inputs for tokprune_nb.scoring."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tokprune_nb.scoring import (cls_attention_scores, clip_similarity_scores, hybrid_scores, minmax_normalize,
                                 relevance_scores)


def eager_attention(q, k, key_mask=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    return logits.softmax(-1)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 4), L=st.integers(2, 12), chunk=st.integers(1, 16), seed=st.integers(0, 99))
def test_cls_attention_matches_eager(B, H, L, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, 8, generator=g), torch.randn(B, H, L, 8, generator=g)
    probs = eager_attention(q, k)
    torch.testing.assert_close(cls_attention_scores(q, k), probs[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(cls_attention_scores(q, k, has_cls=False, chunk_size=chunk), probs.mean((1, 2)))


def test_cls_attention_with_padding_equals_unpadded():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out = cls_attention_scores(q, k, mask=mask)
    ref = cls_attention_scores(q[1:, :, :5], k[1:, :, :5])
    torch.testing.assert_close(out[1, :4], ref[0])
    assert torch.all(out[1, 4:] == 0)
    recv = cls_attention_scores(q, k, has_cls=False, mask=mask, chunk_size=3)
    torch.testing.assert_close(recv[1, :5], cls_attention_scores(q[1:, :, :5], k[1:, :, :5], has_cls=False)[0])
    assert torch.all(recv[1, 5:] == 0)


def test_cls_attention_bad_inputs():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match='same shape'):
        cls_attention_scores(q, torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match='3 or 4 dimensions'):
        cls_attention_scores(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match='L >= 2'):
        cls_attention_scores(torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match='chunk_size'):
        cls_attention_scores(q, q, has_cls=False, chunk_size=0)


def test_relevance_batched_with_prompt_mask():
    torch.manual_seed(1)
    feats, prompt = torch.randn(2, 6, 5), torch.randn(2, 4, 5)
    pm = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = relevance_scores(feats, prompt, pm)
    torch.testing.assert_close(out[1], relevance_scores(feats[1], prompt[1, :2]))
    torch.testing.assert_close(out[0], F.cosine_similarity(feats[0], prompt[0].mean(0)[None], dim=-1))
    mx = relevance_scores(feats, prompt, pm, reduce='max')
    torch.testing.assert_close(mx[1], F.cosine_similarity(feats[1][:, None], prompt[1, :2][None], dim=-1).amax(-1))


def test_relevance_bad_inputs():
    with pytest.raises(ValueError, match='must match `feats`'):
        relevance_scores(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match='`prompt_mask` must have shape'):
        relevance_scores(torch.randn(3, 4), torch.randn(2, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match='NaN or inf'):
        relevance_scores(torch.full((3, 4), float('nan')), torch.randn(2, 4))


@pytest.mark.parametrize('sign', [1, -1])
def test_clip_similarity_sign(sign):
    torch.manual_seed(2)
    cf, ct = torch.randn(3, 7, 6), torch.randn(3, 6)
    out = clip_similarity_scores(cf, ct, sign=sign)
    ref = F.cosine_similarity(cf, ct[:, None], dim=-1)
    torch.testing.assert_close(out, sign * ref)
    assert torch.equal(out.argmax(-1), (sign * ref).argmax(-1))


def test_clip_similarity_bad_sign():
    for s in (0, 2, True, 0.5):
        with pytest.raises(ValueError, match='`sign` must be 1 or -1'):
            clip_similarity_scores(torch.randn(3, 4), torch.randn(4), sign=s)


def test_hybrid_normalisation_and_alpha():
    rel = torch.tensor([[0.2, 0.4, 0.3, 9.0]])
    sal = torch.tensor([[1e-3, 5e-3, 2e-3, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = hybrid_scores(rel, sal, 0.5, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.5 * 0.5 + 0.5 * 0.25, 0.0]]))
    assert torch.all((hybrid_scores(rel, sal, 0.3) >= 0) & (hybrid_scores(rel, sal, 0.3) <= 1))
    with pytest.raises(ValueError, match='same shape'):
        hybrid_scores(rel, sal[:, :3], 0.5)
    with pytest.raises(TypeError, match='`alpha` must be a float'):
        hybrid_scores(rel, sal, '0.5')
    torch.testing.assert_close(minmax_normalize(torch.tensor([3.0, 3.0, 3.0])), torch.zeros(3))


# ---------------------------------------------------------------- issue 11: exact ties and batches

@pytest.mark.parametrize('reduce', ['mean', 'max'])
def test_relevance_identical_tokens_score_identically(reduce):
    "Five (or many) identical tokens: one score, bit for bit (a BLAS matrix-vector product gave the tail rows another)."
    for N, D in [(5, 37), (5, 64), (9, 100), (23, 129), (300, 1000)]:
        g = torch.Generator().manual_seed(N + D)
        feats = torch.randn(D, generator=g).expand(N, D).contiguous()
        out = relevance_scores(feats, torch.randn(4, D, generator=g), reduce=reduce)
        assert out.unique().numel() == 1, (N, D)


@pytest.mark.parametrize('reduce', ['mean', 'max'])
def test_relevance_batch_equals_alone_bit_exactly(reduce):
    "Padded batches (D not a multiple of 16: unaligned images), padded prompts, holes in prompt masks, views."
    rng = torch.Generator().manual_seed(0)
    for case in range(60):
        B, N, T = 3, int(torch.randint(1, 40, (1,), generator=rng)), int(torch.randint(1, 7, (1,), generator=rng))
        D = int(torch.randint(3, 70, (1,), generator=rng)); D += D % 16 == 0
        feats, prompt = torch.randn(B, N, D, generator=rng), torch.randn(B, T, D, generator=rng)
        pm = torch.rand(B, T, generator=rng) > 0.4
        pm[:, 0] = True
        out = relevance_scores(feats, prompt, pm, reduce=reduce)
        for b in range(B):
            alone = relevance_scores(feats[b].clone(), prompt[b][pm[b]].clone(), reduce=reduce)
            assert torch.equal(out[b], alone), (case, b)
        nc = feats.transpose(1, 2).contiguous().transpose(1, 2)      # a non-contiguous view of the same values
        assert torch.equal(relevance_scores(nc, prompt, pm, reduce=reduce), out)


def test_clip_similarity_batch_equals_alone_and_ties():
    g = torch.Generator().manual_seed(3)
    cf, ct = torch.randn(3, 11, 37, generator=g), torch.randn(3, 37, generator=g)
    out = clip_similarity_scores(cf, ct)
    for b in range(3):
        assert torch.equal(out[b], clip_similarity_scores(cf[b].clone(), ct[b].clone()))
    same = torch.randn(37, generator=g).expand(9, 37).contiguous()
    assert clip_similarity_scores(same, ct[0]).unique().numel() == 1

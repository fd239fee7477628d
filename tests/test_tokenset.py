"""TokenSet (tokprune_nb.core): grids (per image, video), batching round trips, meta tensors, docstrings."""
import inspect

import pytest
import torch

from tokprune_nb import TokenSet
from tokprune_nb.core import check_grid, check_mask, check_tensor


def ts_(n, grid=None, d=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return TokenSet(torch.randn(n, d, generator=g), grid=grid, saliency=torch.rand(n, generator=g),
                    prompt=torch.randn(2 + seed % 3, d, generator=g), **kw)


# ---------------------------------------------------------------- grids

@pytest.mark.parametrize('grid, n', [((2, 3), 6), ([2, 3], 6), ((2, 2, 3), 12), ((1, 1), 1), ((3, 1, 1), 3)])
def test_grid_accepts_2d_and_video(grid, n):
    ts = TokenSet(torch.randn(n, 4), grid=grid)
    assert ts.grid == tuple(grid) and isinstance(ts.grid, tuple) and ts.grid_of(0) == tuple(grid)


@pytest.mark.parametrize('grid, err, match', [
    ((2, 2), ValueError, r'`grid` \(2, 2\) has 4 cells but feats has N=6 tokens'),
    ((1, 2, 2), ValueError, r'`grid` \(1, 2, 2\) has 4 cells'),
    ((6,), ValueError, r'\(h, w\) or \(t, h, w\)'),
    ((1, 1, 2, 3), ValueError, r'\(h, w\) or \(t, h, w\)'),
    ((0, 6), ValueError, 'positive ints'),
    ((-2, -3), ValueError, 'positive ints'),
    ((2, 3.0), TypeError, 'positive ints'),
    ((True, 6), TypeError, 'positive ints'),
    ('23', TypeError, 'positive ints'),
    (6, TypeError, 'positive ints'),
    (((2, 3),), TypeError, 'positive ints'),   # per-image grids only on a batch
])
def test_grid_rejected(grid, err, match):
    with pytest.raises(err, match=match):
        TokenSet(torch.randn(6, 4), grid=grid)


def test_batch_grids_shared_and_per_image():
    feats = torch.randn(3, 6, 4)
    assert TokenSet(feats, grid=(2, 3)).grid == (2, 3)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    per = TokenSet(feats, mask=mask, grid=[(2, 3), [1, 2, 2], None])
    assert per.grid == ((2, 3), (1, 2, 2), None)
    assert [per.grid_of(b) for b in range(3)] == [(2, 3), (1, 2, 2), None]
    shared = TokenSet(feats, mask=mask, grid=(3, 2))   # a shared grid describes the images without padding
    assert [shared.grid_of(b) for b in range(3)] == [(3, 2), None, None]
    assert TokenSet(feats, mask=mask, grid=(None, None, None)).grid is None
    with pytest.raises(ValueError, match=r'`grid\[1\]` \(2, 3\) has 6 cells but image 1 has 4 real tokens'):
        TokenSet(feats, mask=mask, grid=((2, 3), (2, 3), None))
    with pytest.raises(ValueError, match='holds 2 per-image grids but the batch has B=3'):
        TokenSet(feats, mask=mask, grid=((2, 3), (2, 2)))
    with pytest.raises(ValueError, match=r'`grid` \(2, 2\) has 4 cells but feats has N=6'):
        TokenSet(feats, mask=mask, grid=(2, 2))
    with pytest.raises(TypeError, match=r'`grid\[0\]`'):
        TokenSet(feats, mask=mask, grid=((2, 3.0), None, None))
    with pytest.raises(ValueError, match='`b` must be an int image index'):
        per.grid_of(3)


def test_single_image_with_mask_grid_counts_real_tokens():
    mask = torch.tensor([True] * 4 + [False] * 2)
    assert TokenSet(torch.randn(6, 4), mask=mask, grid=(2, 2)).grid == (2, 2)
    with pytest.raises(ValueError, match='the image has 4 real tokens'):
        TokenSet(torch.randn(6, 4), mask=mask, grid=(2, 3))


def test_stack_split_index_unsqueeze_keep_grids():
    a, b, c = ts_(6, (2, 3), seed=1), ts_(4, (2, 2), seed=2), ts_(12, (3, 2, 2), seed=3)
    n = ts_(5, None, seed=4)
    bt = TokenSet.stack([a, b, c, n])
    assert bt.grid == ((2, 3), (2, 2), (3, 2, 2), None)
    bt.validate()                                          # the stacked grids are valid
    for s, back in zip([a, b, c, n], bt.split()):
        assert back.grid == s.grid and torch.equal(back.feats, s.feats)
        back.validate()
    for i, s in enumerate([a, b, c, n]):
        one = bt.index(i)
        assert one.grid == s.grid and one.validate() is one
        assert one.unsqueeze().grid_of(0) == s.grid
        one.unsqueeze().validate()
    # equal sizes and grids: one shared grid; equal sizes, different grids: one per image
    assert TokenSet.stack([a, a]).grid == (2, 3)
    assert TokenSet.stack([a, ts_(6, (3, 2))]).grid == ((2, 3), (3, 2))
    assert TokenSet.stack([a, ts_(6, None)]).grid == ((2, 3), None)
    assert TokenSet.stack([ts_(6), ts_(4)]).grid is None
    assert a.unsqueeze().grid == (2, 3)
    # a batch of stacked batches' images round-trips too
    again = TokenSet.stack(bt.split())
    assert again.grid == bt.grid and torch.equal(again.feats, bt.feats) and torch.equal(again.mask, bt.mask)


# ---------------------------------------------------------------- meta tensors, validation messages

@pytest.mark.parametrize('field', ['feats', 'mask', 'saliency', 'prompt', 'prompt_mask', 'clip_feats', 'clip_text'])
def test_meta_tensors_are_named(field):
    kw = dict(feats=torch.randn(4, 8), mask=torch.ones(4, dtype=torch.bool), saliency=torch.rand(4),
              prompt=torch.randn(3, 8), prompt_mask=torch.ones(3, dtype=torch.bool), clip_feats=torch.randn(4, 5),
              clip_text=torch.randn(5))
    kw[field] = kw[field].to('meta')
    with pytest.raises(ValueError, match=f'`{field}` is on the meta device'):
        TokenSet(**kw)


def test_meta_feats_alone():
    with pytest.raises(ValueError, match='`feats` is on the meta device: meta tensors have no data'):
        TokenSet(torch.randn(4, 8, device='meta'))
    with pytest.raises(ValueError, match='`x` is on the meta device'):
        check_tensor(torch.empty(2, 3, device='meta'), 'x', (2,))
    check_tensor(torch.empty(2, 3, device='meta'), 'x', (2,), finite=False)   # shapes and dtypes only: fine
    check_mask(torch.ones(3, dtype=torch.bool, device='meta'), 'm', (3,))


def test_validate_after_mutation():
    ts = ts_(6, (2, 3))
    ts.grid = (3, 3)
    with pytest.raises(ValueError, match='has 9 cells'):
        ts.validate()
    ts.grid = [3, 2]
    assert ts.validate() is ts and ts.grid == (3, 2)


def test_check_grid_directly():
    assert check_grid([2, 5], 10) == (2, 5)
    with pytest.raises(ValueError, match='`g` \\(2, 5\\) has 10 cells but image 3 has 9 real tokens'):
        check_grid((2, 5), 9, 'g', 'image 3 has 9 real tokens')


# ---------------------------------------------------------------- documentation

@pytest.mark.parametrize('attr', ['device', 'validate', 'batched', 'n_tokens', 'dim', 'batch_size', 'valid_counts',
                                  'has', 'grid_of', 'stack', 'split', 'index', 'unsqueeze', 'trusted'])
def test_tokenset_members_are_documented(attr):
    assert getattr(TokenSet, attr).__doc__, attr


def test_device_property():
    ts = ts_(3)
    assert ts.device == torch.device('cpu') and ts.device == ts.feats.device

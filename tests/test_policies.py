"""Property and bad-input tests for every selection policy (tokprune_nb.policies)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from tokprune_nb import TokenSet
from tokprune_nb.policies import (POLICIES, ATP, ClsAttnPrune, DivPrune, DPPPrune, KMeansPrune, RandomPrune, RelevancePrune,
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
    """A padded batch selects what each image selects alone, grids included (each image keeps its own grid:
    UniformPrune picks the same spatial sub-grid as alone, not evenly spaced sequence positions)."""
    a, b = make_ts(1, (4, 4), seed=1, batched=False), make_ts(1, (3, 3), seed=2, batched=False)
    pb = TokenSet.stack([a, b])
    assert pb.grid == ((4, 4), (3, 3))
    for pol in all_policies(0.5):
        out = pol(pb)
        ka, kb = pol.budget(16), pol.budget(9)
        assert out.shape == (2, ka)
        assert torch.equal(out[0], pol(a))
        assert torch.equal(out[1, :kb], pol(b))
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


# ---------------------------------------------------------------- issue 11: grids, validation, repr/eq, ties, batches
import inspect
import random

from tokprune_nb import policies as policies_module
from tokprune_nb.policies import POLICIES, Policy, video_subsample


def test_uniform_mixed_size_batch_keeps_each_grid():
    """Defect 1: a mixed-size batch used to lose its grids (UniformPrune then took a diagonal / evenly spaced
    sequence positions); every image now keeps its grid and the batch selects exactly what each image does alone."""
    g = torch.Generator().manual_seed(0)
    sets = [TokenSet(torch.randn(h * w, 6, generator=g), grid=(h, w)) for h, w in [(6, 6), (4, 5), (3, 3)]]
    bt = TokenSet.stack(sets)
    assert bt.grid == ((6, 6), (4, 5), (3, 3))
    for keep in (0.25, 0.5, 4, 9):
        pol = UniformPrune(keep)
        out = pol(bt)
        for b, s in enumerate(sets):
            k = pol.budget(s.n_tokens)
            assert torch.equal(out[b, :k], pol(s)), (keep, b)
            assert torch.equal(out[b, :k], grid_subsample(*s.grid, k).sort().values)
    # 9 of 36 on the 6x6 image alone is the 3x3 sub-grid, not positions 0, 4, 9, ... of the sequence
    assert UniformPrune(9)(bt)[0].tolist() == [r * 6 + c for r in (0, 2, 5) for c in (0, 2, 5)]
    # same token counts, different grids (4x4 and 2x8): each image its own sub-grid
    a, b = TokenSet(torch.randn(16, 3), grid=(4, 4)), TokenSet(torch.randn(16, 3), grid=(2, 8))
    out = UniformPrune(4)(TokenSet.stack([a, b]))
    assert torch.equal(out[0], UniformPrune(4)(a)) and torch.equal(out[1], UniformPrune(4)(b))


def test_uniform_video_grid():
    "A (t, h, w) clip grid: the budget shared evenly between frames, each frame's share spread over its grid."
    ts = TokenSet(torch.randn(4 * 6 * 6, 3), grid=(4, 6, 6))
    out = UniformPrune(36)(ts)
    frames = out // 36
    assert frames.bincount(minlength=4).tolist() == [9, 9, 9, 9]
    assert torch.equal(out[:9], grid_subsample(6, 6, 9))
    assert video_subsample(4, 6, 6, 2).tolist() == [grid_subsample(6, 6, 1).item(), 3 * 36 + grid_subsample(6, 6, 1).item()]
    assert UniformPrune(6)(ts).div(36, rounding_mode='floor').bincount(minlength=4).tolist() == [2, 1, 1, 2]   # extras: frames 0 and 3
    assert torch.equal(UniformPrune(1.0)(ts), torch.arange(144))
    with pytest.raises(ValueError, match='`k` must be in'):
        video_subsample(2, 2, 2, 9)


# defect 2: every constructor argument validated, never coerced -------------------------------------------------

def _bad_values(p:inspect.Parameter):
    "Wrong values for a constructor parameter, derived from its default (or, for `keep`, from the budget rules)."
    if p.default is inspect.Parameter.empty:   # keep
        return ['0.5', True, None, 0, -2, 0.0, 1.5, float('nan')]
    d, nullable = p.default, 'None' in str(p.annotation)
    if isinstance(d, bool): out = [1, 0, 'yes', 1.0]
    elif isinstance(d, int): out = [1.7, 2.0, True, '1', 1 + 0j]
    elif isinstance(d, float): out = ['0.5', True, float('nan'), -1.0, float('inf')]
    elif isinstance(d, str): out = [1, b'mean', d.upper() + '_', ['mean']]
    else: raise AssertionError(f'no bad values for {p}')
    return out + ([] if nullable or d is None else [None])


CTOR_PARAMS = [(name, p) for name, cls in POLICIES.items()
               for p in list(inspect.signature(cls.__init__).parameters.values())[1:]]


@pytest.mark.parametrize('name, param', CTOR_PARAMS, ids=[f'{n}-{p.name}' for n, p in CTOR_PARAMS])
def test_every_constructor_argument_is_validated(name, param):
    cls = POLICIES[name]
    kw = {} if param.name == 'keep' else {'keep': 0.5}
    for bad in _bad_values(param):
        with pytest.raises((TypeError, ValueError), match=f'`{param.name}`'):
            cls(**kw, **{param.name: bad})
            raise AssertionError(f'{cls.__name__}({param.name}={bad!r}) was accepted')


@pytest.mark.parametrize('bad, err, match', [
    (lambda: RandomPrune(0.5, seed=1.7), TypeError, r'`seed` must be an int .*got float 1.7'),
    (lambda: KMeansPrune(0.5, normalize='no'), TypeError, r'`normalize` must be a bool'),
    (lambda: ZSPAPrune(0.5, normalize=1), TypeError, r'`normalize` must be a bool'),
    (lambda: ZSPAPrune(0.5, seed='a'), TypeError, r'`seed` must be an int'),
    (lambda: ZSPAPrune(0.5, seed=-1), ValueError, r'`seed` must be an int in \[0, '),
    (lambda: KMeansPrune(0.5, iters=2.0), TypeError, r'`iters` must be an int >= 1, got float'),
    (lambda: KMeansPrune(0.5, n_trials=True), TypeError, r'`n_trials` must be a positive int or None'),
    (lambda: ATP(0.5, sign=1.0), TypeError, r'`sign` must be 1 or -1'),
    (lambda: ATP(0.5, saliency_layer=True), TypeError, r'`saliency_layer` must be an int'),
    (lambda: RelevancePrune(0.5, reduce=None), TypeError, r"`reduce` must be one of 'mean', 'max'"),
    (lambda: DPPPrune(0.5, theta='1'), TypeError, r'`theta` must be a finite number >= 0'),
    (lambda: DPPPrune(0.5, theta=float('inf')), ValueError, r'`theta` must be a finite number >= 0'),
])
def test_constructors_never_coerce(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


# defect 3: complete repr, eval(repr) round trip, equality and hash -----------------------------------------------

NON_DEFAULT = {
    'zspaprune': dict(keep=7, relevance_frac=0.35, diversity='maxmin', seed=3, iters=4, n_trials=None, reduce='max',
                      normalize=False, seed_rounds=None),
    'atp': dict(keep=0.3, alpha=0.25, saliency_layer=-3, sign=-1, relevance='prompt'),
    'random': dict(keep=5, seed=11),
    'uniform': dict(keep=0.4),
    'cls_attn': dict(keep=3, saliency_layer=-5),
    'relevance': dict(keep=0.2, reduce='max'),
    'kmeans': dict(keep=0.6, seed=2, iters=7, normalize=False, n_trials=3, seed_rounds=5),
    'divprune': dict(keep=4, metric='euclidean'),
    'dpp': dict(keep=0.45, theta=2.5, reduce='max'),
}


@pytest.mark.parametrize('name', list(POLICIES))
def test_repr_eval_roundtrip_equality_hash(name):
    cls = POLICIES[name]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kw = {**NON_DEFAULT[name], 'merge_pruned': True}   # every selection policy also takes the merge-back flag
    assert set(kw) == {p.name for p in params}, f'NON_DEFAULT[{name!r}] must set every constructor parameter'
    for p in params:
        assert p.default is inspect.Parameter.empty or kw[p.name] != p.default, (name, p.name)
    pol = cls(**kw)
    r = repr(pol)
    for k, v in kw.items():
        assert f'{k}={v!r}' in r, (r, k)
    rebuilt = eval(r, vars(policies_module))
    assert type(rebuilt) is cls and rebuilt == pol and hash(rebuilt) == hash(pol) and repr(rebuilt) == r
    assert pol == cls(**kw) and len({pol, cls(**kw)}) == 1
    assert pol != cls(kw['keep']) or not params[1:], 'defaults must differ from the non-default policy'
    for p in params[1:]:   # changing any one parameter breaks equality
        assert pol != cls(**{**kw, p.name: p.default}), (name, p.name)
    assert pol != object() and pol != UniformPrune(0.5) or name == 'uniform'


def test_equality_distinguishes_count_from_fraction():
    assert RandomPrune(1) != RandomPrune(1.0)   # one token vs every token: 1 == 1.0 in Python, not here
    assert UniformPrune(0.5) == UniformPrune(0.5) and ZSPAPrune(0.5) != KMeansPrune(0.5)
    assert repr(UniformPrune(3)) == 'UniformPrune(keep=3)'


def test_policy_subclass_contract():
    class Mine(Policy):
        def __init__(self, keep, width:int=2): super().__init__(keep); self.width = width
    assert repr(Mine(3)) == 'Mine(keep=3, width=2)' and Mine(3) == Mine(3) and Mine(3) != Mine(3, 4)
    with pytest.raises(TypeError, match='must name every parameter'):
        class Loose(Policy):
            def __init__(self, keep, **kw): super().__init__(keep)
    class Forgetful(Policy):
        def __init__(self, keep, width:int=2): super().__init__(keep)
    with pytest.raises(AttributeError, match=r"\['width'\]"):
        repr(Forgetful(3))


# defect 4: ties go to the earlier token; a batch selects exactly what each image selects alone -------------------

# RandomPrune and UniformPrune choose by position, not by content: their choice does not depend on the features
_POSITIONAL = ('random', 'uniform')


@pytest.mark.parametrize('name', list(POLICIES))
@pytest.mark.parametrize('N, D', [(5, 37), (5, 64), (6, 37), (9, 100), (11, 37), (23, 129), (64, 300)])
def test_identical_tokens_give_earliest_indices(name, N, D):
    g = torch.Generator().manual_seed(N * 1000 + D)
    feats = torch.randn(D, generator=g).expand(N, D).contiguous()
    ts = TokenSet(feats, saliency=torch.full((N,), 0.3), prompt=torch.randn(3, D, generator=g),
                  clip_feats=torch.randn(4, generator=g).expand(N, 4).contiguous(), clip_text=torch.randn(4, generator=g))
    for k, variant in [(k, v) for k in sorted({1, 2, N // 2, N - 1, N} - {0}) for v in ('default', 'non-default')]:
        pol = POLICIES[name](k) if variant == 'default' else POLICIES[name](**{**NON_DEFAULT[name], 'keep': k})
        out = pol(ts)
        if name in _POSITIONAL:   # the same positions as for any other tokens
            other = TokenSet(torch.randn(N, D, generator=g), saliency=torch.rand(N, generator=g),
                             prompt=ts.prompt, clip_feats=torch.randn(N, 4, generator=g), clip_text=ts.clip_text)
            assert torch.equal(out, pol(other))
        else:
            assert out.tolist() == list(range(k)), (pol, out.tolist())
        assert torch.equal(pol(TokenSet.stack([ts, ts, ts]))[2], out)   # and the same in a batch


def _random_tokenset(rng:random.Random, g:torch.Generator, N:int, D:int, C:int)->TokenSet:
    kind = rng.choice(['gauss', 'ints', 'dups'])
    if kind == 'gauss': f = torch.randn(N, D, generator=g)
    elif kind == 'ints': f = torch.randint(-2, 3, (N, D), generator=g).float()   # exact ties in every score
    else: f = torch.randn(3, D, generator=g)[torch.randint(0, 3, (N,), generator=g)]   # duplicated tokens
    T = rng.randint(1, 6)
    return TokenSet(f, saliency=torch.rand(N, generator=g).round(decimals=1),   # saliency ties too
                    prompt=torch.randn(T, D, generator=g) if kind == 'gauss' else torch.randint(-2, 3, (T, D), generator=g).float(),
                    clip_feats=torch.randn(N, C, generator=g) if kind == 'gauss' else f[:, :C].clone(),
                    clip_text=torch.randn(C, generator=g))


@pytest.mark.parametrize('name', list(POLICIES))
def test_batch_equals_alone_bit_exactly(name):
    """200 random cases per policy: D not a multiple of 16 (BLAS then sees image 1 and 2 of a batch at unaligned
    addresses), random prompts of different lengths, batches of 3 with different and with equal token counts,
    integer-valued and duplicated tokens (exact ties): the batch row equals the image alone, bit for bit."""
    rng = random.Random(hash(name) % 1000)
    cls = POLICIES[name]
    for case in range(200):
        g = torch.Generator().manual_seed(case)
        D = rng.choice([d for d in range(3, 70) if d % 16]); C = min(D, rng.randint(2, 9))
        Ns = [rng.randint(4, 40)] * 3 if case % 2 else [rng.randint(4, 40) for _ in range(3)]
        sets = [_random_tokenset(rng, g, N, D, C) for N in Ns]
        if case % 4 == 0: sets = [TokenSet(s.feats, grid=(1, s.n_tokens), saliency=s.saliency, prompt=s.prompt,
                                           clip_feats=s.clip_feats, clip_text=s.clip_text) for s in sets]
        bt = TokenSet.stack(sets)
        keep = rng.choice([0.1, 0.25, 0.5, 0.9, 1, 2, 3])
        pol = cls(keep) if case % 3 else cls(**{**NON_DEFAULT[name], 'keep': keep})   # every parameter's code path
        out = pol(bt)
        for b, s in enumerate(sets):
            k = pol.budget(s.n_tokens)
            assert torch.equal(out[b, :k], pol(s)), (case, pol, b)
            assert torch.equal(out[b, :k], pol(bt.split()[b])) and torch.equal(out[b:b + 1, :k], pol(bt.index(b).unsqueeze()))


# defect 5: docstrings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(POLICIES))
def test_needs_is_documented(name):
    assert POLICIES[name].needs.__doc__, name   # the property's own docstring (getdoc would fall back to the base's)


@pytest.mark.parametrize('name', sorted(POLICIES))
def test_keep_everything_runs_no_selection(name, monkeypatch):
    """A budget of every real token (keep=1.0, or an int count equal to N) returns all indices without `_select`."""
    cls = POLICIES[name]
    def boom(self, ts, k): raise AssertionError(f"{name}: _select ran for a budget of every token")
    monkeypatch.setattr(cls, '_select', boom)
    ts = make_ts(2, (4, 4), seed=1)
    assert torch.equal(cls(1.0)(ts), torch.arange(16).repeat(2, 1))
    assert torch.equal(cls(1.0)(ts.split()[0]), torch.arange(16))
    assert torch.equal(cls(16)(ts.split()[1]), torch.arange(16))
    a, b = make_ts(1, (2, 3), seed=2, batched=False), make_ts(1, (4, 4), seed=3, batched=False)
    out = cls(1.0)(TokenSet.stack([a, b]))                       # padded batch: -1 at the end of the short row
    assert torch.equal(out, torch.tensor([list(range(6)) + [-1] * 10, list(range(16))]))


@pytest.mark.parametrize('name', sorted(POLICIES))
def test_keep_everything_same_as_selection(name):
    """The shortcut returns what a full selection returned: every index, sorted."""
    ts = make_ts(2, (3, 5), seed=4)
    pol = POLICIES[name](1.0)
    full = pol._select(ts, ts.n_tokens).sort(-1).values
    assert torch.equal(pol(ts), full)


class _ModeProbe(RandomPrune):
    "RandomPrune that records whether its selection ran in inference mode."
    seen = []
    def _select(self, ts, k):
        _ModeProbe.seen.append(torch.is_inference_mode_enabled())
        return super()._select(ts, k)


@pytest.mark.parametrize("padded", [False, True])
def test_selection_runs_in_inference_mode_and_returns_ordinary_tensors(padded):
    """Policies select under `torch.inference_mode()` (no autograd bookkeeping per small op) on both paths (one shape;
    a padded batch image by image), and hand back ordinary tensors: writable in place, usable where autograd saves them."""
    ts = make_ts(2, (4, 4))
    if padded:
        mask = torch.ones(2, 16, dtype=torch.bool); mask[1, 12:] = False
        ts = TokenSet(ts.feats, mask=mask, saliency=ts.saliency, prompt=ts.prompt, clip_feats=ts.clip_feats, clip_text=ts.clip_text)
    _ModeProbe.seen.clear()
    out = _ModeProbe(0.5)(ts)
    assert _ModeProbe.seen and all(_ModeProbe.seen)
    assert not torch.is_inference_mode_enabled()
    for p in all_policies(0.5) + [ZSPAPrune(0.5, merge_pruned=True)]:
        r = p(ts)
        for t in ([r] if isinstance(r, torch.Tensor) else [r.index, r.feats, r.size, r.assign, r.weight]):
            assert not t.is_inference(), f"{p!r} returned an inference tensor"
    out.add_(0)                                                            # in place: allowed on an ordinary tensor
    f = ts.feats.clone().requires_grad_()
    with torch.enable_grad():
        f.gather(1, out.clamp_min(0)[..., None].expand(-1, -1, f.shape[-1])).sum().backward()   # saved for backward
    assert f.grad is not None

"Edge cases, bad inputs, property tests and the scikit-learn comparison for `tokprune_nb.diversity`."
import math, warnings
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from tokprune_nb.diversity import kmeans, kmeans_inertia, kmeans_nearest, nearest_to_centres, maxmin_select, _unique_nearest, _greedy_pairs

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mask(B, N, n_min, seed):
    "Random [B,N] mask with at least n_min True per row (padding anywhere, not only at the end)."
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) > 0.35
    for b in range(B):
        if int(m[b].sum()) < n_min: m[b, torch.randperm(N, generator=g)[:n_min]] = True
    return m


@st.composite
def batches(draw, max_b=3, max_n=14, max_d=5):
    B = draw(st.integers(1, max_b)); N = draw(st.integers(2, max_n)); D = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(['gauss', 'ints', 'dups']))
    if kind == 'gauss': x = _randn(B, N, D, seed=seed)
    elif kind == 'ints': x = torch.randint(-2, 3, (B, N, D), generator=torch.Generator().manual_seed(seed)).float()
    else: x = _randn(B, 2, D, seed=seed)[:, torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed))]
    use_mask = draw(st.booleans())
    k = draw(st.integers(1, N // 2 if use_mask else N))
    mask = _mask(B, N, k + 1, seed) if use_mask else None
    return x, k, mask, seed


# ---------------------------------------------------------------- k-means vs scikit-learn

@pytest.fixture
def one_thread():
    "The sklearn comparisons run many small fits: on a shared 2-core machine one thread each is several times faster."
    from threadpoolctl import threadpool_limits
    n = torch.get_num_threads(); torch.set_num_threads(1)
    with threadpool_limits(1): yield
    torch.set_num_threads(n)


def _sk_inertias(X, k, seeds, iters):
    from sklearn.cluster import KMeans
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return np.array([KMeans(n_clusters=k, init='k-means++', n_init=1, max_iter=iters, random_state=s).fit(X).inertia_
                         for s in range(seeds)])


def _datasets():
    from sklearn.datasets import make_blobs, load_digits
    rng = np.random.default_rng(0)
    return {
        'blobs-separated': (make_blobs(400, centers=8, n_features=16, random_state=0)[0], 8),
        'blobs-k>centres': (make_blobs(300, centers=4, n_features=8, cluster_std=2., random_state=1)[0], 10),
        'gaussian': (rng.normal(size=(300, 24)), 12),
        'uniform-2d': (rng.uniform(size=(300, 2)), 15),
        'digits': (load_digits().data[:500], 10),
        'blobs-512d-sketched': (make_blobs(300, centers=10, n_features=512, cluster_std=4., random_state=2)[0], 10),
    }


@pytest.mark.parametrize('name', list(_datasets()))
def test_inertia_matches_sklearn(name, one_thread):
    """Median and best inertia over 8 seeds each, same iteration cap: ours within 2% of sklearn's.
    One seed each would compare two draws of a heavy-tailed distribution (an unlucky start costs +100%)."""
    X, k = _datasets()[name]
    X = X.astype(np.float32)
    sk = _sk_inertias(X, k, 8, 300)
    xt = torch.from_numpy(X)
    ours = np.array([float(kmeans_inertia(xt, *kmeans(xt, k, iters=300, seed=s))) for s in range(8)])
    assert np.median(ours) <= 1.02 * np.median(sk), (np.median(ours), np.median(sk))
    assert ours.min() <= 1.02 * sk.min(), (ours.min(), sk.min())


@pytest.mark.parametrize('name', ['blobs-separated', 'gaussian', 'digits'])
def test_default_iters_close_to_sklearn(name, one_thread):
    "With the default 10 iterations (sklearn: up to 300) the median inertia is still within 2%."
    X, k = _datasets()[name]
    X = X.astype(np.float32)
    sk = _sk_inertias(X, k, 6, 300)
    xt = torch.from_numpy(X)
    ours = np.array([float(kmeans_inertia(xt, *kmeans(xt, k, seed=s))) for s in range(6)])
    assert np.median(ours) <= 1.02 * np.median(sk)


def test_inertia_helper_matches_direct():
    x = _randn(30, 4); C, a = kmeans(x, 3)
    ref = ((x - C[a]) ** 2).sum()
    assert torch.allclose(kmeans_inertia(x, C, a), ref, rtol=1e-5)


# ---------------------------------------------------------------- k-means properties

def test_kmeans_deterministic_and_seed_matters():
    x = _randn(200, 6, seed=3)
    C1, a1 = kmeans(x, 12, seed=5); C2, a2 = kmeans(x, 12, seed=5)
    assert torch.equal(C1, C2) and torch.equal(a1, a2)
    assert any(not torch.equal(kmeans(x, 12, seed=s)[0], C1) for s in range(6, 9))


def test_kmeans_deterministic_sketched():
    x = _randn(2, 60, 300, seed=1)                       # D > init_dim: the sketched seeding
    C1, a1 = kmeans(x, 5, seed=2, init_dim=32); C2, a2 = kmeans(x, 5, seed=2, init_dim=32)
    assert torch.equal(C1, C2) and torch.equal(a1, a2)


@SETTINGS
@given(batches())
def test_kmeans_batch_equals_per_image(case):
    x, k, mask, seed = case
    Cb, ab = kmeans(x, k, seed=seed % 7, mask=mask, iters=5)
    for b in range(x.shape[0]):
        Ci, ai = kmeans(x[b], k, seed=seed % 7, mask=None if mask is None else mask[b], iters=5)
        assert torch.equal(Cb[b], Ci) and torch.equal(ab[b], ai)


@SETTINGS
@given(batches())
def test_kmeans_outputs_valid(case):
    x, k, mask, seed = case
    C, a = kmeans(x, k, seed=seed, mask=mask)
    B, N, D = x.shape
    assert C.shape == (B, k, D) and a.shape == (B, N) and a.dtype == torch.long
    assert torch.isfinite(C).all()
    m = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    assert (a[~m] == -1).all() and ((a[m] >= 0) & (a[m] < k)).all()
    # every valid point is assigned to a nearest centre (ties allowed)
    d = torch.cdist(x.double(), C.double()) ** 2
    got = d.gather(2, a.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert (got[m] <= d.min(-1).values[m] + 1e-4 * (1 + d.min(-1).values[m])).all()


def test_kmeans_batch_equals_per_image_llava_shape():
    "Bitwise batch == single at a realistic size (sketched seeding, matmul blocking)."
    x = torch.nn.functional.normalize(_randn(3, 150, 1024, seed=4), dim=-1)
    m = _mask(3, 150, 40, 4)
    Cb, ab = kmeans(x, 12, mask=m)
    for b in range(3):
        Ci, ai = kmeans(x[b], 12, mask=m[b])
        assert torch.equal(Cb[b], Ci) and torch.equal(ab[b], ai)


def test_cluster_sums_onehot_path_matches_index_add():
    "The accelerator path (one-hot matmul) computes the same sums and counts as the CPU path (index_add_)."
    from tokprune_nb.diversity import _cluster_sums
    x = _randn(3, 25, 6, seed=18); m = _mask(3, 25, 5, 18)
    a = torch.randint(0, 4, (3, 25), generator=torch.Generator().manual_seed(18)).masked_fill(~m, -1)
    s1, c1 = _cluster_sums(x, x.reshape(-1, 6), a, m, 4, x.new_empty(13, 6), onehot=False)
    s2, c2 = _cluster_sums(x, x.reshape(-1, 6), a, m, 4, x.new_empty(13, 6), onehot=True)
    assert torch.allclose(s1, s2, atol=1e-5) and torch.equal(c1, c2)
    ref = torch.stack([torch.stack([x[b][(a[b] == j) & m[b]].sum(0) for j in range(4)]) for b in range(3)])
    assert torch.allclose(s1, ref, atol=1e-5)


@pytest.mark.parametrize('N,k', [(5, 5), (7, 3), (1, 1)])
def test_kmeans_identical_points(N, k):
    x = torch.full((N, 3), 2.5)
    C, a = kmeans(x, k)
    assert torch.equal(C, torch.full((k, 3), 2.5)) and ((a >= 0) & (a < k)).all()


def test_kmeans_k_equals_n_with_duplicates():
    x = torch.tensor([[0., 0.], [0., 0.], [1., 1.], [1., 1.], [5., 5.]])
    C, a = kmeans(x, 5)
    assert torch.isfinite(C).all()
    assert kmeans_inertia(x, C, a) == 0                 # every point sits on a centre
    assert {tuple(c) for c in C.tolist()} == {(0., 0.), (1., 1.), (5., 5.)}


def test_kmeans_mask_ignores_padding_values():
    x = _randn(2, 20, 4, seed=7); m = _mask(2, 20, 8, 7)
    C1, a1 = kmeans(x, 4, mask=m)
    x2 = x.clone(); x2[~m] = 1e4                        # padding values must not matter
    C2, a2 = kmeans(x2, 4, mask=m)
    assert torch.equal(C1, C2) and torch.equal(a1, a2) and (a1[~m] == -1).all()


def test_kmeans_padding_removed_equals_masked():
    "Masking tokens gives the same clusters as dropping them (indices aside)."
    x = _randn(30, 5, seed=8); m = _mask(1, 30, 10, 8)[0]
    C1, a1 = kmeans(x, 4, mask=m)
    C2, a2 = kmeans(x[m], 4)
    assert torch.allclose(C1, C2) and torch.equal(a1[m], a2)


def test_kmeans_iters_zero_gives_data_points():
    x = _randn(40, 3, seed=9)
    C, a = kmeans(x, 6, iters=0)
    assert all((x == c).all(-1).any() for c in C)
    assert torch.equal(a, torch.cdist(x, C).argmin(-1))


def test_kmeans_large_tol_stops_early_but_consistent():
    x = _randn(100, 4, seed=10)
    C, a = kmeans(x, 5, tol=1e9)
    assert torch.equal(a, torch.cdist(x, C).argmin(-1))  # assignments match the returned centres


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_kmeans_dtypes(dtype):
    x = _randn(50, 8, seed=11).to(dtype)
    C, a = kmeans(x, 4)
    assert C.dtype == dtype and a.dtype == torch.long and torch.isfinite(C.float()).all()


# ---------------------------------------------------------------- nearest_to_centres

def _greedy_ref(x, centres, mask):
    "Slow reference: repeatedly take the globally closest unused (centre, token) pair."
    x, c = x.double(), centres.double()
    d = ((c[:, None] - x[None]) ** 2).sum(-1)
    d[:, ~mask] = math.inf
    out = [None] * len(c)
    for _ in range(len(c)):
        j = int(torch.argmin(d)); ci, ti = divmod(j, d.shape[1])
        out[ci] = ti; d[ci, :] = math.inf; d[:, ti] = math.inf
    return out


@SETTINGS
@given(batches())
def test_nearest_to_centres_properties(case):
    x, k, mask, seed = case
    B, N, D = x.shape
    cen = _randn(B, k, D, seed=seed + 1)
    if seed % 3 == 0: cen[:, -1] = cen[:, 0]            # duplicate centres force conflicts
    idx = nearest_to_centres(x, cen, mask=mask)
    m = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    assert idx.shape == (B, k) and idx.dtype == torch.long
    for b in range(B):
        assert len(set(idx[b].tolist())) == k and m[b, idx[b]].all()
        single = nearest_to_centres(x[b], cen[b], mask=m[b])
        assert torch.equal(single, idx[b])
        ref = _greedy_ref(x[b], cen[b], m[b])
        # the reference runs in float64: compare the distances of the picks (exact ties may pick other tokens)
        dd = ((cen[b, :, None].double() - x[b][None].double()) ** 2).sum(-1)
        got = dd.gather(1, idx[b][:, None]).squeeze(1); want = dd.gather(1, torch.tensor(ref)[:, None]).squeeze(1)
        assert torch.allclose(got.sort().values, want.sort().values, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(1, 4), st.integers(0, 2**16))
def test_nearest_to_centres_equals_sequential_greedy(N, D, seed):
    """Generic float64 data, centres crowded together (many conflicts): the rounds equal the one-pair-at-a-time
    greedy. (Duplicate centres are exact ties, broken by rounding that differs between the two; see above.)"""
    k = 1 + seed % N
    x = _randn(N, D, seed=seed, dtype=torch.float64)
    cen = 0.3 * _randn(k, D, seed=seed + 1, dtype=torch.float64)
    m = torch.ones(N, dtype=torch.bool)
    if seed % 2 and N - k >= 2: m[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:N - k - 1]] = False
    assert nearest_to_centres(x, cen, mask=m).tolist() == _greedy_ref(x, cen, m)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 12), st.integers(0, 2**16), st.integers(1, 4))
def test_unique_nearest_equals_sequential_greedy_with_ties(B, k, extra, seed, levels):
    "Integer distances (ties everywhere) and unavailable columns: the rounds equal the one-pair-at-a-time greedy."
    N = k + extra
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, levels, (B, k, N), generator=g).double()
    for b in range(B):  # up to `extra` unavailable columns
        d[b, :, torch.randperm(N, generator=g)[:int(torch.randint(0, extra + 1, (1,), generator=g))]] = math.inf
    want = []
    for b in range(B):
        db, row = d[b].clone(), [None] * k
        for _ in range(k):
            j = int(torch.argmin(db)); c, t = divmod(j, N)
            row[c] = t; db[c, :] = math.inf; db[:, t] = math.inf
        want.append(row)
    assert _unique_nearest(d.clone()).tolist() == want
    assert _greedy_pairs(d.clone()).tolist() == want    # the traced form: the greedy itself, k fixed steps


def test_nearest_to_centres_no_conflict_is_plain_nearest():
    x = _randn(50, 4, seed=12)
    cen = x[[3, 17, 29, 41]] + 0.01
    assert nearest_to_centres(x, cen).tolist() == [3, 17, 29, 41]


def test_nearest_to_centres_conflict_resolved():
    tok = torch.tensor([[0.], [1.], [3.]])
    assert nearest_to_centres(tok, torch.tensor([[1.6], [0.9]])).tolist() == [2, 1]
    assert nearest_to_centres(tok, torch.tensor([[1.], [1.], [1.]])).tolist() == [1, 0, 2]


@SETTINGS
@given(batches(), st.integers(0, 12))
def test_kmeans_nearest_equals_two_calls(case, iters):
    "The fused call equals kmeans + nearest_to_centres exactly, per image and in a batch."
    x, k, mask, seed = case
    got = kmeans_nearest(x, k, iters=iters, seed=seed, mask=mask)
    C, _ = kmeans(x, k, iters=iters, seed=seed, mask=mask)
    assert torch.equal(got, nearest_to_centres(x, C, mask=mask))
    for b in range(x.shape[0]):
        assert torch.equal(got[b], kmeans_nearest(x[b], k, iters=iters, seed=seed, mask=None if mask is None else mask[b]))


def test_kmeans_nearest_llava_shape():
    x = torch.nn.functional.normalize(_randn(2, 200, 1024, seed=17), dim=-1)
    m = _mask(2, 200, 60, 17)
    got = kmeans_nearest(x, 20, mask=m)
    assert torch.equal(got, nearest_to_centres(x, kmeans(x, 20, mask=m)[0], mask=m))
    assert all(len(set(r.tolist())) == 20 for r in got) and m.gather(1, got).all()


def test_nearest_to_centres_after_kmeans():
    x = _randn(2, 80, 16, seed=13)
    C, _ = kmeans(x, 20)
    idx = nearest_to_centres(x, C)
    assert all(len(set(r.tolist())) == 20 for r in idx)


# ---------------------------------------------------------------- maxmin_select

def _maxmin_ref(x, k, selected, mask, metric, start):
    "Slow float64 reference; returns (indices, min-distance of each pick at the time it was picked, best possible)."
    X = x.double()
    if metric == 'cosine': X = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    def dist(i, j): return float(1 - X[i] @ X[j]) if metric == 'cosine' else float(((X[i] - X[j]) ** 2).sum())
    valid = [i for i in range(len(X)) if mask[i]]
    chosen, out, trace = list(selected), [], []
    if not chosen:
        if start == 'mean':
            mu = X[valid].mean(0)
            score = {i: float(-(X[i] @ mu)) if metric == 'cosine' else float(((X[i] - mu) ** 2).sum()) for i in valid}
        else:
            score = {i: min([dist(i, j) for j in valid if j != i], default=math.inf) for i in valid}
        best = max(score.values()); first = min(i for i in valid if score[i] == best)
        out.append(first); chosen.append(first); trace.append((score[first], best))
    while len(out) < k:
        md = {i: min(dist(i, j) for j in chosen) for i in valid if i not in chosen}
        best = max(md.values()); pick = min(i for i in md if md[i] == best)
        out.append(pick); chosen.append(pick); trace.append((best, best))
    return out, trace


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 16), st.integers(2, 6), st.integers(0, 2**16), st.sampled_from(['cosine', 'euclidean']),
       st.sampled_from(['mean', 'isolated']), st.integers(0, 3))
def test_maxmin_matches_reference_generic(N, D, seed, metric, start, s):
    "Generic-position float64 data (D >= 2: in 1-D all cosines are +-1, all ties): exactly the reference's picks."
    x = _randn(N, D, seed=seed, dtype=torch.float64)
    s = min(s, N - 1); k = int(torch.randint(1, N - s + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    sel = torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1))[:s]
    got = maxmin_select(x, k, selected=sel if s else None, metric=metric, start=start)
    ref, _ = _maxmin_ref(x, k, sel.tolist(), torch.ones(N, dtype=torch.bool), metric, start)
    assert got.tolist() == ref


@SETTINGS
@given(batches(), st.sampled_from(['cosine', 'euclidean']), st.integers(0, 3))
def test_maxmin_properties(case, metric, s):
    "Unique, valid, excludes `selected`, batch == per image, and each pick is a max-min pick (up to ties)."
    x, k, mask, seed = case
    B, N, D = x.shape
    m = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    s = min(s, int(m.sum(1).min()) - k)
    sel = torch.stack([torch.nonzero(m[b]).squeeze(1)[torch.randperm(int(m[b].sum()), generator=torch.Generator().manual_seed(seed + b))[:s]]
                       for b in range(B)]) if s > 0 else None
    out = maxmin_select(x, k, selected=sel, mask=mask, metric=metric)
    assert out.shape == (B, k) and out.dtype == torch.long
    for b in range(B):
        r = out[b].tolist()
        assert len(set(r)) == k and m[b, out[b]].all()
        if sel is not None: assert not set(r) & set(sel[b].tolist())
        single = maxmin_select(x[b], k, selected=None if sel is None else sel[b], mask=m[b], metric=metric)
        assert torch.equal(single, out[b])
        # replay in float64: every pick's min-distance to the chosen set is (within rounding) the largest available
        X = x[b].double()
        if metric == 'cosine': X = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        def dist(i, j): return float(1 - X[i] @ X[j]) if metric == 'cosine' else float(((X[i] - X[j]) ** 2).sum())
        chosen = [] if sel is None else sel[b].tolist()
        for t, p in enumerate(r):
            if chosen:
                avail = [i for i in range(N) if m[b, i] and i not in chosen]
                md = {i: min(dist(i, j) for j in chosen) for i in avail}
                assert md[p] >= max(md.values()) - 1e-5 * (1 + max(md.values()))
            chosen.append(p)


def test_maxmin_selected_with_minus_one_padding():
    x = _randn(2, 20, 5, seed=14)
    sel = torch.tensor([[3, 7, 11], [5, -1, -1]])
    out = maxmin_select(x, 4, selected=sel)
    assert torch.equal(out[0], maxmin_select(x[0], 4, selected=torch.tensor([3, 7, 11])))
    assert torch.equal(out[1], maxmin_select(x[1], 4, selected=torch.tensor([5])))
    out = maxmin_select(x, 4, selected=torch.tensor([[3, -1], [-1, -1]]))
    assert torch.equal(out[1], maxmin_select(x[1], 4))   # no seed: the start rule


def test_maxmin_all_points_with_duplicates():
    x = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., 1.]])
    out = maxmin_select(x, 4)
    assert sorted(out.tolist()) == [0, 1, 2, 3]


def test_maxmin_zero_vectors_cosine():
    x = torch.tensor([[0., 0.], [1., 0.], [0., 1.]])
    assert sorted(maxmin_select(x, 3).tolist()) == [0, 1, 2]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_maxmin_half_precision(dtype):
    x = _randn(40, 8, seed=15)
    assert maxmin_select(x.to(dtype), 5).tolist() == maxmin_select(x.to(dtype).float(), 5).tolist()


# ---------------------------------------------------------------- bad inputs

X2 = torch.zeros(6, 3)


@pytest.mark.parametrize('call,exc,msg', [
    (lambda: kmeans([[0.]], 1), TypeError, '`x` must be a torch.Tensor'),
    (lambda: kmeans(torch.zeros(6), 1), ValueError, '`x` must have shape [N,D]'),
    (lambda: kmeans(torch.zeros(1, 2, 6, 3), 1), ValueError, '`x` must have shape [N,D]'),
    (lambda: kmeans(torch.zeros(6, 3, dtype=torch.int64), 1), TypeError, 'floating-point'),
    (lambda: kmeans(torch.zeros(0, 3), 1), ValueError, 'non-empty'),
    (lambda: kmeans(torch.tensor([[0., math.nan]]), 1), ValueError, 'NaN or inf'),
    (lambda: kmeans(torch.tensor([[0., math.inf]]), 1), ValueError, 'NaN or inf'),
    (lambda: kmeans(X2, 0), ValueError, '`k` must be an int >= 1'),
    (lambda: kmeans(X2, 2.0), TypeError, '`k` must be an int'),
    (lambda: kmeans(X2, True), TypeError, '`k` must be an int'),
    (lambda: kmeans(X2, 7), ValueError, '`k`=7 is larger than the number of valid points (6)'),
    (lambda: kmeans(X2, 3, mask=torch.tensor([True, True, False, False, False, False])), ValueError, 'valid points (2)'),
    (lambda: kmeans(torch.zeros(2, 4, 3), 3, mask=torch.tensor([[True] * 4, [True, False, False, False]])),
     ValueError, 'in the smallest image'),
    (lambda: kmeans(X2, 2, iters=-1), ValueError, '`iters` must be an int >= 0'),
    (lambda: kmeans(X2, 2, seed=-1), ValueError, '`seed` must be an int >= 0'),
    (lambda: kmeans(X2, 2, seed=0.5), TypeError, '`seed` must be an int'),
    (lambda: kmeans(X2, 2, tol=-1e-3), ValueError, '`tol` must be a finite number >= 0'),
    (lambda: kmeans(X2, 2, tol=math.inf), ValueError, '`tol` must be a finite number >= 0'),
    (lambda: kmeans(X2, 2, tol='0'), ValueError, '`tol` must be a finite number >= 0'),
    (lambda: kmeans(X2, 2, n_trials=0), ValueError, '`n_trials` must be an int >= 1'),
    (lambda: kmeans(X2, 2, init_dim=0), ValueError, '`init_dim` must be an int >= 1'),
    (lambda: kmeans(X2, 2, mask=torch.ones(6)), TypeError, '`mask` must have dtype torch.bool'),
    (lambda: kmeans(X2, 2, mask=[True] * 6), TypeError, '`mask` must be a bool torch.Tensor'),
    (lambda: kmeans(X2, 2, mask=torch.ones(5, dtype=torch.bool)), ValueError, '`mask` must have shape (6,)'),
    (lambda: kmeans(torch.zeros(2, 6, 3), 2, mask=torch.ones(6, dtype=torch.bool)), ValueError, '`mask` must have shape (2, 6)'),
    (lambda: kmeans_nearest(X2, 7), ValueError, '`k`=7 is larger than the number of valid points (6)'),
    (lambda: kmeans_nearest(X2, 2, iters=1.5), TypeError, '`iters` must be an int'),
    (lambda: kmeans_nearest(torch.zeros(6, 3, dtype=torch.int32), 2), TypeError, 'floating-point'),
    (lambda: kmeans_inertia(X2, torch.zeros(2, 4), torch.zeros(6, dtype=torch.long)), ValueError, '`centres` must be a float tensor'),
    (lambda: kmeans_inertia(X2, torch.zeros(2, 3), torch.zeros(5, dtype=torch.long)), ValueError, '`assign` must be a LongTensor of shape (6,)'),
    (lambda: kmeans_inertia(X2, torch.zeros(2, 3), torch.full((6,), 2)), ValueError, 'cluster ids >= k'),
    (lambda: nearest_to_centres(X2, [[0., 0., 0.]]), TypeError, '`centres` must be a torch.Tensor'),
    (lambda: nearest_to_centres(X2, torch.zeros(2, 3, dtype=torch.long)), TypeError, '`centres` must be a floating-point'),
    (lambda: nearest_to_centres(X2, torch.zeros(2, 4)), ValueError, '`centres` must have shape [k,3]'),
    (lambda: nearest_to_centres(X2, torch.zeros(0, 3)), ValueError, 'k >= 1'),
    (lambda: nearest_to_centres(X2, torch.zeros(1, 2, 3)), ValueError, '`centres` must have shape [k,3]'),
    (lambda: nearest_to_centres(torch.zeros(2, 6, 3), torch.zeros(3, 2, 3)), ValueError, '`centres` must have shape [2,k,3]'),
    (lambda: nearest_to_centres(X2, torch.zeros(7, 3)), ValueError, 'only 6 valid tokens'),
    (lambda: nearest_to_centres(X2, torch.full((2, 3), math.nan)), ValueError, '`centres` contains NaN'),
    (lambda: nearest_to_centres(X2, torch.zeros(2, 3), mask=torch.zeros(6, dtype=torch.bool)), ValueError, 'only 0 valid tokens'),
    (lambda: maxmin_select(X2, 0), ValueError, '`k` must be an int >= 1'),
    (lambda: maxmin_select(X2, 7), ValueError, '6 valid tokens are left'),
    (lambda: maxmin_select(X2, 5, selected=torch.tensor([0, 1])), ValueError, '4 valid tokens are left after `selected`'),
    (lambda: maxmin_select(X2, 2, metric='l2'), ValueError, "`metric` must be 'cosine' or 'euclidean'"),
    (lambda: maxmin_select(X2, 2, start='random'), ValueError, "`start` must be 'mean' or 'isolated'"),
    (lambda: maxmin_select(X2, 2, selected=[0]), TypeError, '`selected` must be a LongTensor'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([0.])), TypeError, '`selected` must have dtype torch.long'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([[0]])), ValueError, '`selected` must have shape [s]'),
    (lambda: maxmin_select(torch.zeros(2, 6, 3), 2, selected=torch.tensor([0])), ValueError, '`selected` must have shape [2,s]'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([6])), ValueError, 'outside [0, 6)'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([-2])), ValueError, 'outside [0, 6)'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([1, 1])), ValueError, 'duplicate'),
    (lambda: maxmin_select(X2, 2, selected=torch.tensor([5]), mask=torch.tensor([True] * 5 + [False])), ValueError, 'padding'),
    (lambda: maxmin_select(X2, 2, mask=torch.ones(6, 1, dtype=torch.bool)), ValueError, '`mask` must have shape (6,)'),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc) as e: call()
    assert msg in str(e.value), str(e.value)


def test_empty_selected_means_none():
    x = _randn(10, 3, seed=16)
    assert torch.equal(maxmin_select(x, 3, selected=torch.empty(0, dtype=torch.long)), maxmin_select(x, 3))
    assert torch.equal(maxmin_select(x, 3, selected=torch.tensor([-1, -1])), maxmin_select(x, 3))


def test_classic_kmeanspp_fast_path_matches_general_path():
    "n_trials=1 takes a leaner loop; with each candidate duplicated the greedy loop must pick the same seeds."
    import tokprune_nb.diversity as dv
    torch.manual_seed(3)
    X = torch.randn(3, 150, 32)
    valid = torch.ones(3, 150, dtype=torch.bool); valid[2, 100:] = False
    xn = dv._sq_norms(X)
    u = dv._uniforms(12, 1, torch.Generator().manual_seed(5), X.device, X.dtype)
    fast = dv._kmeanspp(X, xn, valid, u)
    general = dv._kmeanspp(X, xn, valid, u.repeat(1, 2))
    assert torch.equal(fast, general)
    assert (fast[2] < 100).all()   # padding never chosen


# ---------------------------------------------------------------- issue 11: exact ties and batches

from tokprune_nb.diversity import _first_copies, _bmm, _aligned


@pytest.mark.parametrize('N, D', [(5, 37), (6, 37), (9, 100), (11, 37), (23, 129), (64, 300), (40, 600)])
def test_identical_tokens_earliest(N, D):
    "Copies of one token: the earliest copies are chosen (BLAS rounds the tail rows of a block differently)."
    x = _randn(D, seed=N).expand(N, D).contiguous()
    for k in sorted({1, 2, N // 2, N - 1}):
        assert sorted(kmeans_nearest(x, k).tolist()) == list(range(k)), ('kmeans', k)   # (in centre order)
        assert sorted(nearest_to_centres(x, x[:k] + 0.0).tolist()) == list(range(k)), ('nearest', k)
        for metric in ('cosine', 'euclidean'):
            assert maxmin_select(x, k, metric=metric).tolist() == list(range(k)), (metric, k)
            assert maxmin_select(x, k, metric=metric, start='isolated').tolist() == list(range(k))
        if k < N - 1:
            assert maxmin_select(x, k, selected=torch.tensor([N - 1])).tolist() == list(range(k))


def test_copies_among_distinct_tokens():
    "Two groups of copies among distinct tokens: each group contributes its earliest copies."
    base = _randn(4, 37, seed=5)
    x = base[[0, 1, 2, 0, 3, 1, 0, 2, 1]]
    first = _first_copies(x[None], torch.ones(1, 9, dtype=torch.bool))
    assert first.tolist() == [[0, 1, 2, 0, 4, 1, 0, 2, 1]]
    out = maxmin_select(x, 4)
    assert sorted(out.tolist()) == [0, 1, 2, 4]
    assert sorted(kmeans_nearest(x, 4).tolist()) == [0, 1, 2, 4]


@pytest.mark.parametrize('fn', ['kmeans_nearest', 'maxmin_select', 'maxmin_seeded', 'nearest_to_centres'])
def test_batch_equals_alone_bit_exactly_unaligned(fn):
    """D not a multiple of 16: images 1, 2 of a batch start at unaligned addresses, where BLAS used to round
    differently from the same image alone. Integer-valued and duplicated tokens make exact ties."""
    rng = np.random.default_rng(0)
    for case in range(80):
        B, N = 3, int(rng.integers(4, 40))
        D = int(rng.choice([d for d in range(3, 70) if d % 16]))
        kind = case % 3
        if kind == 0: x = _randn(B, N, D, seed=case)
        elif kind == 1: x = torch.from_numpy(rng.integers(-2, 3, (B, N, D))).float()
        else: x = _randn(B, 3, D, seed=case)[:, torch.from_numpy(rng.integers(0, 3, N))]
        k = int(rng.integers(1, N // 2 + 1))
        for b in range(B):
            xa = x[b].clone()
            if fn == 'kmeans_nearest': got, want = kmeans_nearest(x, k, seed=case)[b], kmeans_nearest(xa, k, seed=case)
            elif fn == 'maxmin_select': got, want = maxmin_select(x, k)[b], maxmin_select(xa, k)
            elif fn == 'maxmin_seeded':
                sel = torch.tensor([[0, N - 1]] * B)
                got, want = maxmin_select(x, k, selected=sel)[b], maxmin_select(xa, k, selected=sel[b])
            else:
                cen = x[:, :k] * 0.9 + 0.1
                got, want = nearest_to_centres(x, cen)[b], nearest_to_centres(xa, cen[b].clone())
            assert torch.equal(got, want), (fn, case, b)


def test_aligned_keeps_strides_and_values():
    x = torch.randn(2, 5, 7)
    v = x.transpose(1, 2)[1:]                     # starts 35 floats in: not 64-byte aligned
    a = _aligned(v)
    assert a.data_ptr() % 64 == 0 and a.stride() == v.stride() and torch.equal(a, v)
    assert _aligned(x) is x
    w = torch.randn(2, 1, 7)
    assert torch.equal(_bmm(w, x.transpose(1, 2))[1], _bmm(w[1:], x[1:].clone().transpose(1, 2))[0])


@pytest.mark.parametrize('k', [51, 115])
def test_policy_seeding_in_rounds_close_to_sklearn(k, one_thread):
    """The selection policies' k-means (classic k-means++ in 16 rounds, 10 Lloyd iterations) on 576 LLaVA-like unit
    tokens (keep 0.111 / 0.25 of 576 after ZSPAPrune's core): median inertia over 6 seeds within 2% of sklearn's
    greedy k-means++, and within 1% of one seed per step."""
    from tokprune_nb.measure.selection_speed import synthetic_tokenset
    x = torch.nn.functional.normalize(synthetic_tokenset(576, 256).feats[0], dim=-1)
    sk = np.median(_sk_inertias(x.numpy(), k, 6, 300))
    med = lambda r: np.median([float(kmeans_inertia(x, *kmeans(x, k, seed=s, n_trials=1, seed_rounds=r))) for s in range(6)])
    rounds, steps = med(16), med(None)
    assert rounds <= 1.02 * sk, (rounds, sk)
    assert rounds <= 1.01 * steps, (rounds, steps)


def test_greedy_seeding_in_rounds_on_separated_blobs(one_thread):
    """With n_trials=None each round keeps the best of 2 + ln k candidate sets: on 20 well separated blobs (k = 20)
    it finds every blob like sklearn, where one candidate per step (or per round) often puts two seeds in one."""
    from sklearn.datasets import make_blobs
    X = make_blobs(600, centers=20, n_features=64, random_state=0)[0].astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sk = np.median(_sk_inertias(X, 20, 5, 300))
    xt = torch.from_numpy(X)
    greedy = np.median([float(kmeans_inertia(xt, *kmeans(xt, 20, seed=s, seed_rounds=16))) for s in range(5)])
    assert greedy <= 1.02 * sk, (greedy, sk)


# ---------------------------------------------------------------- the CPU fast paths give the same results

def test_first_min_cpu_form_equals_sync_free_form():
    """`_first_min` computes the near-tie-aware argmin two ways: fewest launches (the sync-free path) and fewest passes
    over `d` (the CPU). Same index on random, integer (exact ties), near-tied and tiny distances, along either dim."""
    from tokprune_nb.diversity import _first_min, gpu_path
    g = torch.Generator().manual_seed(0)
    for t in range(600):
        k, N = int(torch.randint(1, 130, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        d = torch.randn(2, k, N, generator=g, dtype=torch.float64 if t % 7 == 0 else torch.float32)
        if t % 3 == 1: d = torch.randint(-3, 3, (2, k, N), generator=g).to(d.dtype)
        if t % 3 == 2: d = d * 1e-30
        if k > 2: d[:, 1] = d[:, 0] * (1 + 1e-7)          # within the tolerance: the lower index wins
        for dim in (1, 2):
            with gpu_path(False): cpu = _first_min(d, dim)
            with gpu_path(True): sf = _first_min(d, dim)
            assert cpu.dtype == sf.dtype == torch.long and torch.equal(cpu, sf), (t, dim)
    assert torch.equal(_first_min(torch.tensor([[[1.0], [1.0 + 1e-8], [0.5]]]), 1), torch.tensor([[2]]))


def test_where_shortcut_equals_torch_where():
    "`_where` off the sync-free path returns `x` or `y` itself when the condition is uniform: the values of torch.where."
    from tokprune_nb.diversity import _where
    x, y = _randn(3, 4, 5, seed=1), _randn(3, 4, 5, seed=2)
    for cond in (torch.ones(3, 1, 1, dtype=torch.bool), torch.zeros(3, 1, 1, dtype=torch.bool),
                 torch.tensor([True, False, True]).view(3, 1, 1)):
        for sf in (False, True):
            assert torch.equal(_where(sf, cond, x, y), torch.where(cond, x, y))
            out = torch.empty_like(x)
            assert _where(sf, cond, x, y, out=out) is out and torch.equal(out, torch.where(cond, x, y))


def test_seed_draws_are_cached_and_never_written():
    "The draws of one geometry are shared between calls (a small cache): a k-means run must leave them as drawn."
    from tokprune_nb.diversity import _cached_draws
    x = torch.nn.functional.normalize(_randn(2, 300, 512, seed=3), dim=-1)
    a = _cached_draws(0, 40, 1, 2, 'cpu', torch.float32, 8, 300)
    assert _cached_draws(0, 40, 1, 2, 'cpu', torch.float32, 8, 300) is a    # the same objects
    before, hits = [t.clone() for t in a], _cached_draws.cache_info().hits
    kmeans_nearest(x, 40, n_trials=1, seed_rounds=8, init_dim=256)        # the same draws: q = 2, R = 8, N = 300
    kmeans(x, 40, n_trials=1, seed_rounds=8, init_dim=256)
    assert _cached_draws.cache_info().hits == hits + 2                      # both runs used these draws
    assert all(torch.equal(t, b) for t, b in zip(a, before))


def test_maxmin_isolated_start_breaks_the_mutual_neighbour_tie_to_the_earlier_token():
    """With start='isolated' the most isolated token and its nearest neighbour, when that neighbour's nearest is it too,
    have the same score exactly: the earlier one starts (was: whichever of the pair's two products rounded lower). The
    case hypothesis found: tokens 2 and 4 are mutual nearest neighbours."""
    x = _randn(6, 6, seed=0, dtype=torch.float64)
    for metric in ('cosine', 'euclidean'):
        ref, _ = _maxmin_ref(x, 3, [], torch.ones(6, dtype=torch.bool), metric, 'isolated')
        assert maxmin_select(x, 3, metric=metric, start='isolated').tolist() == ref
    assert maxmin_select(x, 1, metric='cosine', start='isolated').tolist() == [2]

"""The selection cost model (`tokprune bench-select --cost-model`): record fields, counting, keep=1.0 costs nothing."""
import json

import pytest
import torch

from tokprune_nb.measure.selection_speed import (COST_ARCHS, cost_model, count_flops, count_launches_syncs, est_gpu_ms,
                                                 main, prefill_ms, synthetic_tokenset)
from tokprune_nb.policies import POLICIES

FIELDS = {'arch', 'policy', 'keep', 'launches', 'syncs', 'flops', 'est_gpu_ms', 'gpu_share'}


def test_counting_launches_syncs_and_flops():
    x = torch.randn(8, 16)
    def f(x):
        y = (x @ x.T).view(-1)        # 1 launch (mm), view is metadata
        n = int(y.argmax())           # 1 launch + 1 sync
        return y[y > 0].sum() + n, y.tolist()   # gt, index (nonzero: a sync), sum, add; tolist: a sync
    launches, syncs = count_launches_syncs(f, x)
    assert syncs == 3 and 5 <= launches <= 7
    assert count_flops(f, x) == 2 * 8 * 8 * 16


def test_prefill_and_estimate():
    assert 14 < prefill_ms('llava-1.5-7b') < 20 and prefill_ms('llava-next-7b') > 4 * prefill_ms('llava-1.5-7b')
    assert est_gpu_ms(1000, 0, 0) == pytest.approx(6.0) and est_gpu_ms(0, 10, 0) == pytest.approx(0.2)


def test_keep_everything_costs_no_selection():
    recs = cost_model(archs=('llava-1.5-7b',), keeps=(1.0,), progress=False)
    assert len(recs) == len(POLICIES) + 1 and all(FIELDS <= set(r) for r in recs)
    for r in recs: assert r['syncs'] == 0 and r['flops'] == 0 and r['launches'] <= 3 and r['gpu_share'] < 0.002, r


def test_cli_cost_model_json(tmp_path):
    out = tmp_path / 'cost.json'
    assert main(['--cost-model', '--archs', 'qwen2.5-vl-7b', '--keep', '0.111', '--policies', 'cls_attn,divprune',
                 '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {'machine', 'records'} and len(data['records']) == 2
    assert all(FIELDS <= set(r) for r in data['records']) and 'launch_us' in data['machine']
    assert {r['arch'] for r in data['records']} == {'qwen2.5-vl-7b'} and set(COST_ARCHS) >= {'qwen2.5-vl-7b'}


SYNC_FREE = sorted(POLICIES) + ['zspaprune-maxmin']   # every policy, k-means ones included


@pytest.mark.parametrize('name', SYNC_FREE)
def test_sync_free_path_has_no_host_syncs(name):
    """On the path a GPU runs (`gpu_path()`), no policy syncs: greedy max-min and DPP, k-means (fixed Lloyd rounds,
    the distinct-nearest matching as k fixed greedy steps) and the top-k policies."""
    from tokprune_nb.diversity import gpu_path
    from tokprune_nb.measure.selection_speed import _cost_policies
    ts = synthetic_tokenset(64, 32, n_clusters=4)
    pol = _cost_policies()[name](0.25)
    with gpu_path(): assert count_launches_syncs(pol, ts)[1] == 0


@pytest.mark.parametrize('name', sorted(POLICIES) + ['zspaprune-maxmin'])
def test_sync_free_path_selects_the_same_tokens(name):
    """`gpu_path()` (fixed iteration count, dense copy map, no 0-d indexing) changes no selected index."""
    from tokprune_nb.diversity import gpu_path
    from tokprune_nb.measure.selection_speed import _cost_policies
    from tokprune_nb import TokenSet
    ts = synthetic_tokenset(100, 48, batch=2, n_clusters=6, seed=3)
    f = ts.feats.clone(); f[:, 7] = f[:, 3]; f[:, 40] = f[:, 3]          # copies: ties go to the earlier token
    ts = TokenSet(f, grid=ts.grid, saliency=ts.saliency, prompt=ts.prompt, clip_feats=ts.clip_feats, clip_text=ts.clip_text)
    for keep in (0.111, 0.25, 0.5):
        pol = _cost_policies()[name](keep)
        with gpu_path(False): cpu = pol(ts)
        with gpu_path(): gpu = pol(ts)
        assert torch.equal(cpu, gpu), (name, keep)


CAPTURE_NAMES = sorted(POLICIES) + ['zspaprune-maxmin']


def _compiled_indices(name, backend, keep=0.25, dim=32):
    from tokprune_nb.measure.selection_speed import _cost_policies
    ts = synthetic_tokenset(64, dim, n_clusters=4)
    pol = _cost_policies()[name](keep)
    eager = pol(ts)
    torch._dynamo.reset()
    return eager, torch.compile(lambda t: pol(t), fullgraph=True, backend=backend)(ts)


@pytest.mark.parametrize('name', CAPTURE_NAMES)
def test_every_policy_traces_as_one_graph(name):
    """`torch.compile(lambda ts: policy(ts), fullgraph=True)` traces every policy without a graph break (the sync-free
    path, random draws as trace-time constants) and the traced graph selects what eager does. `aot_eager` runs the
    traced graph with eager kernels: seconds per policy, where inductor's code generation takes minutes on 2 cores."""
    eager, out = _compiled_indices(name, 'aot_eager')
    assert torch.equal(eager, out), (name, eager, out)


@pytest.mark.parametrize('name', ['kmeans', 'zspaprune'])
def test_sketched_kmeans_traces_as_one_graph(name):
    "D > init_dim: k-means++ seeds on a random sketch, whose signs are drawn at trace time too."
    eager, out = _compiled_indices(name, 'aot_eager', dim=288)
    assert torch.equal(eager, out), (name, eager, out)


def test_inductor_compiles_a_greedy_loop_to_the_same_indices():
    """One policy end to end through inductor (the backend CUDA graphs use): greedy max-min, same indices as eager.
    (k-means under inductor: its fused kernels round distances differently, and one of 16 picks can move.)"""
    eager, out = _compiled_indices('zspaprune-maxmin', None)
    assert torch.equal(eager, out), (eager, out)


def test_capture_routing_on_cuda(monkeypatch):
    """The routing of the captured form, with a faked CUDA device check (no GPU here): unpadded CUDA selections go
    through one cached compiled function per (policy, budget, shapes); opt-outs, padded batches and the CPU do not."""
    from tokprune_nb import policies as P
    from tokprune_nb import TokenSet
    calls = []
    def fake_compile(fn):
        calls.append(fn)
        def run(t): run.n += 1; return fn(t)
        run.n = 0
        return run
    monkeypatch.setattr(P, '_compile', fake_compile)
    monkeypatch.setattr(P, '_CAPTURED', {})
    ts = synthetic_tokenset(64, 32, n_clusters=4)
    pol = P.DivPrune(0.25)
    want = pol(ts)                                           # CPU: eager, nothing compiled
    assert not calls and not P._CAPTURED
    monkeypatch.setattr(P, '_is_cuda', lambda device: True)  # a CUDA TokenSet, as far as the routing can tell
    assert torch.equal(pol(ts), want) and len(calls) == 1
    assert torch.equal(pol(ts), want) and len(calls) == 1    # cached: the same shapes and budget reuse the graph
    (fn,) = P._CAPTURED.values(); assert fn.n == 2
    P.DivPrune(0.5)(ts); pol(synthetic_tokenset(100, 32, n_clusters=4))
    assert len(calls) == 3                                   # another budget, another shape: another graph
    P.DivPrune(1.0)(ts); assert len(calls) == 3              # keep everything: no selection at all
    off = P.DivPrune(0.25); off.capture = False
    assert torch.equal(off(ts), want) and fn.n == 2          # per-policy opt-out
    monkeypatch.setattr(P, 'CAPTURE', False)
    assert torch.equal(pol(ts), want) and fn.n == 2          # module-wide opt-out (env TOKPRUNE_CAPTURE=0)
    monkeypatch.setattr(P, 'CAPTURE', True)
    m = torch.ones(1, 64, dtype=torch.bool); m[0, 60:] = False
    pol(TokenSet(ts.feats, mask=m)); assert len(calls) == 3  # a padded batch: eager, image by image
    def broken(fn):
        def run(t): raise RuntimeError('no graph')
        return run
    monkeypatch.setattr(P, '_compile', broken); monkeypatch.setattr(P, '_CAPTURED', {})
    with pytest.warns(UserWarning, match='running eagerly'): assert torch.equal(pol(ts), want)
    assert list(P._CAPTURED.values()) == [None]              # failed once: eager from then on, no retry


def test_captured_cost_counts_one_graph_and_no_syncs():
    """Captured: one graph replay plus a per-node floor, no syncs; `--capture/--no-capture` switch the records."""
    from tokprune_nb.measure.selection_speed import GRAPH_LAUNCH_US, GRAPH_NODE_US
    assert est_gpu_ms(1000, 5, 0, captured=True) == pytest.approx((GRAPH_LAUNCH_US + 1000 * GRAPH_NODE_US) / 1e3)
    assert est_gpu_ms(1000, 5, 0, captured=True) < est_gpu_ms(1000, 5, 0)
    for cap in (True, False):
        recs = cost_model(archs=('llava-1.5-7b',), keeps=(1.0, 0.25), policies=('kmeans', 'divprune'), progress=False,
                          capture=cap)
        assert all(FIELDS <= set(r) and 'captured' in r for r in recs)
        assert [r['captured'] for r in recs] == [False, cap, False, cap]   # keep everything: no selection, no graph
        if cap: assert all(r['syncs'] == 0 for r in recs)                 # the traced path cannot sync

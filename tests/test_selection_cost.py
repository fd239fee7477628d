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


SYNC_FREE = ['divprune', 'dpp', 'zspaprune-maxmin', 'relevance', 'cls_attn', 'random', 'uniform']


@pytest.mark.parametrize('name', SYNC_FREE)
def test_sync_free_path_has_no_host_syncs(name):
    """On the path a GPU runs (`gpu_path()`), the greedy max-min and DPP loops and the top-k policies never sync."""
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

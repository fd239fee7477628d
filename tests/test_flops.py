"""FLOP counts: fvcore vs FlopCounterMode vs the formula, on each family's tiny model and the 7B configs."""
import warnings
import pytest
import torch
from transformers import LlamaConfig

from tokprune_nb.measure.flops import (count_flops, analytic_prefill_flops, analytic_prefill_breakdown, meta_prefill_flops,
                               ARCH_CONFIGS, reference_seq_len, prefill_table, fvcore_analysis, torch_flop_counter,
                               torch_flop_counts, CounterRefused, FVCORE_REFUSED, FVCORE_META_REFUSED)
from tokprune_nb.registry import families, family_of, family_for_config
from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs, tiny_clip, tiny_qwen2_5_vl, tiny_qwen_inputs
from tokprune_nb.policies import ZSPAPrune, ATP, ClsAttnPrune, DPPPrune, DivPrune, RandomPrune

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
FAMILIES = tuple(f.name for f in families().values())   # every registered family


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    "Each registered family's tiny model, processor and one prompt's inputs (built by the family's own builders)."
    out = {}
    for f in families().values():
        m, p = f.tiny(); out[f.name] = (m, p, f.inputs(p, ["what color is the cat ?"]))
    return out


def test_families_registered():
    assert {"llava", "llava-next", "qwen2.5-vl"} <= set(FAMILIES)
    assert {"llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b"} <= set(ARCH_CONFIGS)


def _close(a, b, rel=0.01): return abs(a - b) <= rel * max(abs(a), abs(b), 1)


def _same(a, b):
    "Two FlopCounts equal except for the counter's name."
    da, db = a.as_dict(), b.as_dict()
    da.pop("counter"); db.pop("counter")
    return da == db


def _fvcore_or_torch(m, inp, *args, **kw):
    "fvcore's count; for a family where fvcore is refused, assert the refusal (naming the family) and count with torch."
    name = family_of(m).name
    if name not in FVCORE_REFUSED: return count_flops(m, inp, *args, **kw)
    with pytest.raises(CounterRefused, match=name): count_flops(m, inp, *args, **kw)
    return count_flops(m, inp, *args, counter="torch", **kw)


def test_refusals_are_for_registered_families():
    assert set(FVCORE_REFUSED) <= set(FAMILIES) and set(FVCORE_META_REFUSED) <= set(FAMILIES)
    assert issubclass(CounterRefused, NotImplementedError)


@pytest.mark.parametrize("family", FAMILIES)
def test_three_way_agreement_unpruned(tiny, family):
    m, p, inp = tiny[family]
    fv, tc = _fvcore_or_torch(m, inp), count_flops(m, inp, counter="torch")
    an = analytic_prefill_flops(m.config, fv.seq_len)
    assert fv.unsupported == {}
    assert _close(fv.llm, tc.llm) and _close(fv.llm, an)
    assert fv.llm == tc.llm == an                      # in fact exact
    assert _same(fv, tc)
    assert fv.selection == 0 and fv.vision > 0 and fv.projector > 0
    assert fv.total == fv.vision + fv.projector + fv.llm


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_one_is_generate_prefill(tiny, family):
    m, p, inp = tiny[family]
    fv = _fvcore_or_torch(m, inp, logits_to_keep=1)
    assert fv.llm == analytic_prefill_flops(m.config, fv.seq_len, lm_head_tokens=1)
    assert fv.lm_head == m.config.get_text_config().hidden_size * m.config.get_text_config().vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_equals_unpruned_and_counts_fall(tiny, family):
    m, p, inp = tiny[family]
    base = _fvcore_or_torch(m, inp)
    full = _fvcore_or_torch(m, inp, ZSPAPrune(1.0))
    assert (full.llm, full.seq_len, full.vision, full.projector) == (base.llm, base.seq_len, base.vision, base.projector)
    prev = full
    for keep in (0.5, 0.25):
        c = _fvcore_or_torch(m, inp, ZSPAPrune(keep))
        assert c.unsupported == {}
        assert c.llm < prev.llm and c.seq_len < prev.seq_len and c.vision == base.vision
        assert c.llm == analytic_prefill_flops(m.config, c.seq_len)
        assert _same(c, count_flops(m, inp, ZSPAPrune(keep), counter="torch"))
        prev = c


@pytest.mark.parametrize("policy", [ATP(0.25), ClsAttnPrune(0.25), DPPPrune(0.25), DivPrune(0.25), RandomPrune(0.25),
                                    ZSPAPrune(0.25, diversity="maxmin")], ids=lambda p: type(p).__name__)
def test_policies_batch_of_three(policy):
    "Every policy's own work is counted the same by both counters; batches with padding too."
    m, p = tiny_llava(); clip, ctok = tiny_clip(m)
    inp = tiny_inputs(p, ["what color is the ball", "describe", "how many red dog are there ?"])
    kw = dict(clip=clip, clip_tokenizer=ctok, tokenizer=p.tokenizer)
    fv, tc = count_flops(m, inp, policy, **kw), count_flops(m, inp, policy, counter="torch", **kw)
    assert fv.unsupported == {} and _same(fv, tc)
    assert fv.batch == 3 and fv.llm == analytic_prefill_flops(m.config, fv.seq_len, batch=3)


def test_qwen_images_of_different_sizes():
    m, p = tiny_qwen2_5_vl()
    inp = tiny_qwen_inputs(p, ["what color is the cat ?", "describe the image"], size=[112, 84])
    fv, tc = count_flops(m, inp, ZSPAPrune(0.5)), count_flops(m, inp, ZSPAPrune(0.5), counter="torch")
    assert fv.unsupported == {} and _same(fv, tc)


def test_analytic_by_hand_and_gqa():
    c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=10)
    b = analytic_prefill_breakdown(c, 3, lm_head_tokens=1)
    assert b == dict(proj=2 * 3 * 8 * (8 + 8 + 4 + 4), attn=2 * 2 * 3 * 3 * 8, mlp=2 * 3 * 3 * 8 * 16, lm_head=80,
                     total=1152 + 288 + 2304 + 80)
    mha = LlamaConfig(**{**c.to_dict(), "num_key_value_heads": 2})
    assert analytic_prefill_flops(mha, 3) - analytic_prefill_flops(c, 3) == 2 * 3 * 8 * 8   # k, v: 2 layers × n·d·(d/2)·2
    assert analytic_prefill_flops(c, 3, batch=4) == 4 * analytic_prefill_flops(c, 3)
    with pytest.raises(ValueError, match="n_tokens"): analytic_prefill_flops(c, 0)
    with pytest.raises(ValueError, match="lm_head_tokens"): analytic_prefill_flops(c, 3, lm_head_tokens=4)


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_7b_three_way_on_meta(arch):
    cfg = ARCH_CONFIGS[arch]()
    for keep in (1.0, 0.111):
        _, n = reference_seq_len(arch, keep)
        a = analytic_prefill_flops(cfg, n, lm_head_tokens=1)
        assert a == meta_prefill_flops(cfg, n, 1, counter="torch")
        name = family_for_config(cfg).name
        if name in FVCORE_META_REFUSED:
            with pytest.raises(CounterRefused, match=name): meta_prefill_flops(cfg, n, 1, counter="fvcore")
        else:
            assert a == meta_prefill_flops(cfg, n, 1, counter="fvcore")


def test_7b_published_numbers():
    "LLaVA-1.5-7B's prefill on 616 tokens ≈ 4.09 T multiply-adds (≈ 8.2 TFLOPs at 2 per MAC), as usually quoted."
    cfg = ARCH_CONFIGS["llava-1.5-7b"]()
    assert abs(analytic_prefill_flops(cfg, 616, lm_head_tokens=1) / 1e12 - 4.089) < 0.001
    tab = {(r["arch"], r["keep"]): r for r in prefill_table()}
    for arch in ARCH_CONFIGS:
        s = [tab[(arch, k)]["ideal_speedup"] for k in (1.0, 0.5, 0.25, 0.111)]
        assert s == sorted(s) and s[0] == 1.0


def test_sdpa_handle_gqa():
    q, k, v = torch.randn(1, 8, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v): return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    fa = fvcore_analysis(Attn(), (q, k, v))
    with torch_flop_counter() as fc: Attn()(q, k, v)
    assert fa.total() == torch_flop_counts(fc)["Global"] == 8 * 5 * 7 * (4 + 4)


def test_bad_inputs():
    m, p = tiny_llava()
    inp = tiny_inputs(p, ["what"])
    with pytest.raises(ValueError, match="counter"): count_flops(m, inp, counter="ptflops")
    with pytest.raises(TypeError, match="not a supported VLM"): count_flops(torch.nn.Linear(2, 2), inp)


# ---- in-LLM stages: per-layer token counts -----------------------------------------------------------------------
INLLM_FAMILIES = ("llava", "llava-next", "qwen2.5-vl")


def _inside_policies():
    "The four in-LLM methods on a 2-layer tiny LM (stage layer 1; PyramidDrop/SparseVLM with explicit layers)."
    from tokprune_nb.inllm.methods import INSIDE
    return {"fastv": INSIDE["fastv"](layer=1, keep=0.5), "pdrop": INSIDE["pdrop"](layers=(1,), ratio=0.5),
            "sparsevlm": INSIDE["sparsevlm"](keep=(0.5,), layers=(0,)), "dart": INSIDE["dart"](layer=1, keep=0.6)}
    # DART keeps more than its 8 pivots here, so its similarity step runs: with the scorer's own keys reused
    # (REUSE_PROJECTIONS) that step is its only matmul, and a budget within the pivots would tally nothing


@pytest.mark.parametrize("family", INLLM_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm", "dart"])
def test_inside_three_way_per_layer_counts(family, method):
    "fvcore == FlopCounterMode == the formula on the per-layer token counts + the runner's scoring tally; a batch of two."
    f = next(f for f in families().values() if f.name == family)
    m, p = f.tiny()
    inp = f.inputs(p, ["what color is the cat ?", "how many dog are there on the left ?"], sizes=[(56, 56), (28, 84)])
    pol = _inside_policies()[method]
    fv, tc = count_flops(m, inp, inside=pol), count_flops(m, inp, inside=pol, counter="torch")
    assert fv.unsupported == {} and _same(fv, tc)
    assert fv.layer_tokens[1] < fv.layer_tokens[0] == fv.seq_len and fv.scoring > 0
    assert fv.llm == analytic_prefill_flops(m.config, fv.layer_tokens, batch=fv.batch) + fv.scoring
    pre = count_flops(m, inp, ZSPAPrune(0.5), inside=pol)                  # composed with pre-LLM pruning
    assert pre.layer_tokens[0] < fv.layer_tokens[0] and pre.llm == analytic_prefill_flops(m.config, pre.layer_tokens, batch=2) + pre.scoring


def test_analytic_hybrid_layers_by_hand():
    "Qwen3.5's layer types: one gated full-attention layer (q_proj twice as wide) and one Gated DeltaNet layer, by hand."
    from transformers import AutoConfig
    base = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=4, vocab_size=10, linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=4,
                linear_value_head_dim=3, linear_conv_kernel_dim=4)
    c = AutoConfig.for_model("qwen3_5_text", layer_types=["full_attention", "linear_attention"], **base)
    n, C = 3, 64
    full_proj, full_attn = n * 8 * (2 * 2 * 4 + 2 * 4 + 2 * 4), 2 * n * n * 2 * 4
    conv = 2 * 1 * 4 + 2 * 3                                    # channels: q, k (1 head of 4), v (2 heads of 3)
    lin_proj = n * 8 * (conv + 2 * 3 + 2 * 2) + n * 2 * 3 * 8
    lin_mix = conv * 4 * (n + 3) + 2 * 1 * (2 * C * C * 4 + C * (C - 1) // 2 * (3 + 4) + 3 * C * 4 * 3 + C * C * 3)
    b = analytic_prefill_breakdown(c, n, lm_head_tokens=1)
    assert (b["proj"], b["attn"], b["mlp"], b["lm_head"]) == (full_proj + lin_proj, full_attn + lin_mix, 2 * n * 3 * 8 * 16, 80)
    bad = AutoConfig.for_model("qwen3_5_text", **base)
    bad.layer_types = ["full_attention", "mamba"]               # (the config's own constructor would replace it)
    with pytest.raises(ValueError, match="layer_types"): analytic_prefill_flops(bad, 3)


def test_analytic_per_layer_counts():
    c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=10)
    assert analytic_prefill_breakdown(c, [3, 3]) == analytic_prefill_breakdown(c, 3)
    b = analytic_prefill_breakdown(c, [3, 2], lm_head_tokens=1)
    assert (b["proj"], b["attn"], b["mlp"], b["lm_head"]) == (5 * 8 * 24, 2 * 9 * 8 + 2 * 4 * 8, 5 * 3 * 8 * 16, 80)
    for bad in ([3], [3, 0], [3, 2.0], (3, True)):
        with pytest.raises(ValueError, match="n_tokens"): analytic_prefill_flops(c, bad)


def test_package_imports_without_fvcore():
    """fvcore is needed to count with it, not to import the package (a device machine's image may lack it:
    `scripts/gpu_selection_check.py` runs there): with fvcore unimportable, the measurement modules still import."""
    import subprocess, sys
    code = ("import sys; sys.modules['fvcore'] = None\n"
            "import tokprune_nb.measure.flops as F, tokprune_nb.measure.bench, tokprune_nb.measure.selection_speed\n"
            "try: F.fvcore_analysis(None, ())\n"
            "except ImportError: print('fvcore needed to count')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fvcore needed to count" in r.stdout

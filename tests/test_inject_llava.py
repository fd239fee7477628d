"""pruned(...) on tiny random LLaVA-1.5 and LLaVA-NeXT models: family specifics (the shared contract is in test_conformance.py): real pruning at 0.25,
per-sample selection, restoration, bad inputs, one vision pass, NeXT tiles/newlines, real checkpoints (hf)."""
import os
import pytest
import torch
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.testing.tiny import tiny_llava, tiny_llava_next, tiny_inputs, tiny_images, tiny_clip
from tokprune_nb.adapters.llava import tower_saliency
from tokprune_nb.policies import RandomPrune, RelevancePrune, ATP, ClsAttnPrune, ZSPAPrune

torch.set_grad_enabled(False)
PROMPTS = ["what is in the image ?", "describe", "how many red dog are there on the left ?"]
NEXT_SIZES = [(40, 50), (30, 60), (28, 28)]


@pytest.fixture(scope="module", params=["llava", "next"])
def fam(request):
    if request.param == "llava":
        model, proc = tiny_llava()
        mk = lambda prompts, **kw: tiny_inputs(proc, prompts, **kw)
    else:
        model, proc = tiny_llava_next()
        mk = lambda prompts, **kw: tiny_inputs(proc, prompts, images=kw.pop("images", None) or
                                               tiny_images(len(prompts), size=NEXT_SIZES[:len(prompts)]), **kw)
    return request.param, model, proc, mk


def lm_lengths(model):
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen, h


def n_selectable(model, inputs):
    "Visual tokens the policy chooses from, per image (all of them, without NeXT newlines)."
    with pruned(model, RandomPrune(keep=1.0)): model(**inputs)
    return [s.numel() for s in last_selection(model)]


def n_image_tokens(inputs):
    return (inputs["input_ids"] == 4).sum(1)


def test_keep_quarter_reaches_lm(fam):
    name, model, proc, mk = fam
    inputs = mk(PROMPTS)
    L = inputs["input_ids"].shape[1]
    n_sel = n_selectable(model, inputs)
    seen, h = lm_lengths(model)
    try:
        with pruned(model, RelevancePrune(keep=0.25)) as ctx:
            out = model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally: h.remove()
    sel = last_selection(model)
    feats = ctx.last.kwargs["mm_encoder_outputs"]["image"].pooler_output
    if name == "llava":
        assert [s.numel() for s in sel] == [4, 4, 4]      # 25% of 16
        assert seen[0] == L - 12                           # every row lost 12 image tokens
    else:
        assert [s.numel() for s in sel] == [round(0.25 * n) for n in n_sel]
        kept = torch.tensor([f.shape[0] for f in feats])
        real = inputs["attention_mask"].sum(1)
        assert seen[0] == int((real - (n_image_tokens(inputs) - kept)).max())   # re-padded to the longest real row
    assert out.logits.shape == (3, seen[0], model.config.text_config.vocab_size)
    assert gen.shape == (3, L + 4) and torch.equal(gen[:, :L], inputs["input_ids"])
    assert seen[1] == seen[0] and all(s == 1 for s in seen[2:])   # prefill once, then one token per step
    assert any(not torch.equal(sel[0], s) for s in sel[1:])       # prompt-aware: per-sample selection


def test_zspa_selects_per_sample(fam):
    "ZSPAPrune (relevance core + diversity) on a padded batch of different prompts: per-sample, one LM pass per step."
    name, model, proc, mk = fam
    inputs = mk(PROMPTS)
    with pruned(model, ZSPAPrune(keep=0.25)):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        sel = last_selection(model)
    assert gen.shape == (3, inputs["input_ids"].shape[1] + 3)
    assert all(s.numel() >= 1 and bool((s[1:] > s[:-1]).all()) for s in sel)
    assert any(not torch.equal(sel[0], s) for s in sel[1:])


def test_per_sample_selection_matches_single(fam):
    "A batch selects for each sample what that sample alone would select (same prompt, same image)."
    name, model, proc, mk = fam
    inputs = mk(PROMPTS)
    with pruned(model, RelevancePrune(keep=0.25)):
        model(**inputs); batch_sel = last_selection(model)
        imgs = tiny_images(3, size=NEXT_SIZES) if name == "next" else tiny_images(3)
        for i, p in enumerate(PROMPTS):
            model(**mk([p], images=[imgs[i]])); assert torch.equal(last_selection(model)[0], batch_sel[i])


def test_batch_logits_match_single_with_pruning(fam):
    "Re-padding keeps each sample's logits: the last-token logits of a padded pruned batch equal batch-1 runs."
    name, model, proc, mk = fam
    inputs = mk(PROMPTS)
    imgs = tiny_images(3, size=NEXT_SIZES) if name == "next" else tiny_images(3)
    with pruned(model, RelevancePrune(keep=0.25)):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for i, p in enumerate(PROMPTS):
            g1 = model.generate(**mk([p], images=[imgs[i]]), max_new_tokens=3, do_sample=False)
            assert torch.equal(g1[0, -3:], gen[i, -3:])


def test_sdpa_default(fam):
    name, model, proc, mk = fam
    assert model.config._attn_implementation == "sdpa"
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def _snapshot(model):
    return {n: set(m.__dict__) for n, m in model.named_modules()}


def test_bad_inputs(fam):
    name, model, proc, mk = fam
    inputs = mk(PROMPTS[:1])
    no_img = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_sizes")}
    with pruned(model, RandomPrune(keep=0.25)):
        with pytest.raises(ValueError, match="no image in the inputs"): model(**no_img)
        with pytest.raises(ValueError, match="no image in the inputs"): model.generate(**no_img, max_new_tokens=2)
    with pytest.raises(ValueError, match="`clip`"):
        with pruned(model, ATP(keep=0.25)): pass
    with pruned(model, RandomPrune(keep=10_000)):
        with pytest.raises(ValueError, match="keep"): model(**inputs)
        with pytest.raises(ValueError, match="keep"): model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(TypeError, match="policy"):
        with pruned(model, "ZSPAPrune"): pass


def test_atp_with_tiny_clip(fam):
    name, model, proc, mk = fam
    inputs = mk(PROMPTS)
    clip, ctok = tiny_clip(model)
    with pytest.raises(ValueError, match="tokenizer"):
        with pruned(model, ATP(keep=0.25), clip=clip, clip_tokenizer=ctok): pass
    with pruned(model, ATP(keep=0.25), clip=clip, clip_tokenizer=ctok, tokenizer=proc.tokenizer):
        model(**inputs); sel = last_selection(model)
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(s.numel() >= 1 for s in sel) and gen.shape[0] == 3
    with pruned(model, ATP(keep=1.0), clip=clip, clip_tokenizer=ctok, tokenizer=proc.tokenizer):
        assert torch.equal(model(**inputs).logits, model.__class__.forward(model, **inputs).logits)


def test_saliency_equals_eager_attention():
    "Saliency recomputed from q/k equals the eager attention weights of the chosen layer (CLS row, heads averaged)."
    model, proc = tiny_llava()
    inputs = tiny_inputs(proc, PROMPTS[:2])
    tower = model.model.vision_tower
    out = tower(inputs["pixel_values"], output_hidden_states=True)
    tower.config._attn_implementation = "eager"
    try: att = tower(inputs["pixel_values"], output_attentions=True).attentions
    finally: tower.config._attn_implementation = "sdpa"
    for layer in (-1, -2, 0):
        s = tower_saliency(tower, out.hidden_states, layer, "default")
        torch.testing.assert_close(s, att[layer].mean(1)[:, 0, 1:])


def test_llava_full_strategy_and_layer_list():
    for kw in (dict(vision_feature_select_strategy="full"), dict(vision_feature_layer=[-2, -1])):
        model, proc = tiny_llava(**kw)
        inputs = tiny_inputs(proc, PROMPTS)
        ref = model(**inputs).logits
        n = int(n_image_tokens(inputs)[0])
        assert n == (17 if "vision_feature_select_strategy" in kw else 16)
        with pruned(model, RandomPrune(keep=1.0)): assert torch.equal(model(**inputs).logits, ref)
        with pruned(model, ClsAttnPrune(keep=0.25)) as ctx:
            out = model(**inputs)
        assert [s.numel() for s in last_selection(model)] == [round(0.25 * n)] * 3
        assert out.logits.shape[1] == inputs["input_ids"].shape[1] - (n - round(0.25 * n))


def test_llava_two_images_in_one_sample():
    model, proc = tiny_llava()
    imgs = tiny_images(3)
    inputs = dict(proc(images=imgs, text=["USER: <image> <image> what is in the image ? ASSISTANT:",
                                          "USER: <image> describe ASSISTANT:"], return_tensors="pt", padding=True))
    ref = model(**inputs).logits
    with pruned(model, RelevancePrune(keep=1.0)): assert torch.equal(model(**inputs).logits, ref)
    with pruned(model, RelevancePrune(keep=0.25)):
        out = model(**inputs); gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(last_selection(model)) == 3
    # row 0 lost 2*12 tokens, row 1 lost 12: the width is the longest real row (padding is removed)
    real = inputs["attention_mask"].sum(1)
    assert out.logits.shape[1] == int((real - torch.tensor([24, 12])).max())
    assert torch.equal(gen[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_next_newlines_follow_their_rows():
    "A row's newline token is kept iff a token of that row is kept; the base image has no newline."
    model, proc = tiny_llava_next()
    inputs = tiny_inputs(proc, ["describe"], images=tiny_images(1, size=(40, 50)))
    nl = model.model.image_newline
    with pruned(model, RandomPrune(keep=1.0)) as ctx:
        model(**inputs)
    full = ctx.last.kwargs["mm_encoder_outputs"]["image"].pooler_output[0]
    is_nl = (full == nl).all(-1)
    n_rows = int(is_nl.sum()); n_sel = full.shape[0] - n_rows
    base = 16                                          # 4x4 base crop, first, no newline
    assert not is_nl[:base].any() and is_nl[-1]
    rows = (torch.cumsum(is_nl.long(), 0) - is_nl.long())   # row of every packed position
    sel_pos = torch.nonzero(~is_nl).flatten()

    def run(keep_sel):   # keep_sel: indices into the selectable tokens
        with pruned(model, lambda ts: torch.as_tensor(keep_sel)) as c:
            model(**inputs)
        return c.last.kwargs["mm_encoder_outputs"]["image"].pooler_output[0]

    only_base = run([0, 5, 15])
    assert only_base.shape[0] == 3 and not (only_base == nl).all(-1).any()
    first_row_tok, last_tok = int(sel_pos[base]), int(sel_pos[-1])
    k = [0, base, n_sel - 1]   # a base token, the first tile-row token, the last token
    out = run(k)
    assert out.shape[0] == 3 + 2 and int((out == nl).all(-1).sum()) == 2
    expect = torch.cat([full[sel_pos[k]], nl[None], nl[None]])
    order = torch.sort(torch.cat([sel_pos[k], torch.nonzero(is_nl).flatten()[[int(rows[first_row_tok]), int(rows[last_tok])]]])).indices
    assert torch.equal(out, expect[order])


def test_next_budget_over_base_and_tiles():
    model, proc = tiny_llava_next()
    inputs = tiny_inputs(proc, PROMPTS, images=tiny_images(3, size=NEXT_SIZES))
    n_sel = n_selectable(model, inputs)
    with pruned(model, RandomPrune(keep=0.5)) as ctx:
        model(**inputs)
    assert [s.numel() for s in last_selection(model)] == [round(0.5 * n) for n in n_sel]
    assert all(int(s.max()) < n for s, n in zip(last_selection(model), n_sel))


@pytest.mark.skipif(not os.environ.get("TOKPRUNE_LLAVA_PATH"), reason="TOKPRUNE_LLAVA_PATH not set: no real LLaVA-1.5 checkpoint")
def test_real_llava_checkpoint():
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    path = os.environ["TOKPRUNE_LLAVA_PATH"]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval(); proc = AutoProcessor.from_pretrained(path)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    inputs = proc(images=tiny_images(1, size=(336, 336)), text=[proc.apply_chat_template(conv, add_generation_prompt=True)],
                  return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with pruned(model, RandomPrune(keep=1.0)): assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)
    with pruned(model, RelevancePrune(keep=0.1)): model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert [s.numel() for s in last_selection(model)] == [58]


@pytest.mark.skipif(not os.environ.get("TOKPRUNE_LLAVA_NEXT_PATH"), reason="TOKPRUNE_LLAVA_NEXT_PATH not set: no real LLaVA-NeXT checkpoint")
def test_real_llava_next_checkpoint():
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    path = os.environ["TOKPRUNE_LLAVA_NEXT_PATH"]
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval(); proc = AutoProcessor.from_pretrained(path)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    inputs = proc(images=tiny_images(1, size=(400, 600)), text=[proc.apply_chat_template(conv, add_generation_prompt=True)],
                  return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with pruned(model, RandomPrune(keep=1.0)): assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref)
    with pruned(model, RelevancePrune(keep=0.1)): model.generate(**inputs, max_new_tokens=4, do_sample=False)

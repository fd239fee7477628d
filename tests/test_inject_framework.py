"""The model-independent parts of the adapter template (adapters.base helpers, property tests) and of the pruned(...)
context mechanics; what every family must do is in test_conformance.py."""
import inspect
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.generation.utils import GenerateDecoderOnlyOutput
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.registry import adapter_class, FAMILIES, families
from tokprune_nb.adapters.base import (image_rows, shorten_rows, splice_generated, pad_token_id, run_policy,
                                       check_policy_inputs, Adapter, Prepared)
from tokprune_nb.adapters.llava import LlavaAdapter
from tokprune_nb.testing.tiny import tiny_llava, tiny_inputs
from tokprune_nb.core import TokenSet
from tokprune_nb.policies import RandomPrune, RelevancePrune

torch.set_grad_enabled(False)
PROMPTS = ["what is in the image ?", "describe", "how many red dog are there on the left ?"]


@pytest.fixture(scope="module")
def llava():
    model, proc = tiny_llava()
    return model, proc, tiny_inputs(proc, PROMPTS)


# ---------------------------------------------------------------- helpers
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_shorten_rows_properties(data):
    B = data.draw(st.integers(1, 4)); L = data.draw(st.integers(2, 12))
    right = data.draw(st.booleans())
    pads = [data.draw(st.integers(0, L - 1)) for _ in range(B)]
    if not right: pads[data.draw(st.integers(0, B - 1))] = 0   # a batch has at least one unpadded row
    else: pads[0] = 0
    am = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        if p and right: am[b, L - p:] = 0
        elif p: am[b, :p] = 0
    ids = torch.randint(5, 50, (B, L)); ids[am == 0] = 0
    keep = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=L, max_size=L), min_size=B, max_size=B)))
    first_real = am.argmax(1)                                              # every row keeps one real token
    keep[torch.arange(B), first_real] |= ~(keep & am.bool()).any(1)
    labels = ids.clone()
    ni, na, ex, pos = shorten_rows(ids, am, keep, pad_id=1, extras={"labels": labels})
    keep = keep & am.bool()                                                # padding is always dropped ...
    S = int(keep.sum(1).max())                                             # ... so the width is the longest real row
    assert ni.shape == (B, S) and na.shape == (B, S) and pos.shape == (B, S)
    for b in range(B):
        real = pos[b] >= 0
        assert torch.equal(pos[b][real], torch.nonzero(keep[b]).flatten())      # kept columns, in order
        assert torch.equal(ni[b][real], ids[b][keep[b]]) and torch.equal(ex["labels"][b][real], labels[b][keep[b]])
        assert (na[b][~real] == 0).all() and (ni[b][~real] == 1).all() and (ex["labels"][b][~real] == -100).all()
        added = torch.nonzero(~real).flatten()      # added padding: contiguous, on the batch's padding side
        is_right = bool(am[:, -1].eq(0).any()) and not bool(am[:, 0].eq(0).any())
        n = added.numel()
        assert torch.equal(added, torch.arange(S - n, S) if is_right else torch.arange(n))


def test_shorten_rows_no_drop_is_identity():
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]]); am = torch.ones(2, 3, dtype=torch.long)
    ni, na, ex, pos = shorten_rows(ids, am, torch.ones(2, 3, dtype=torch.bool), 0)
    assert ni is ids and na is am and torch.equal(pos, torch.tensor([[0, 1, 2], [0, 1, 2]]))
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]]); am = torch.tensor([[0, 1, 1], [1, 1, 1]])   # padding, nothing dropped:
    ni, na, ex, pos = shorten_rows(ids, am, torch.ones(2, 3, dtype=torch.bool), 0)           # the same layout
    assert torch.equal(ni, ids) and torch.equal(na, am) and torch.equal(pos, torch.tensor([[-1, 1, 2], [0, 1, 2]]))


def test_padding_is_removed_after_pruning():
    "Defect: a mixed batch kept its padding columns; the width must be the longest real row after pruning."
    ids = torch.tensor([[0, 0, 0, 0, 5, 9, 6], [7, 9, 9, 9, 9, 9, 8]]); am = (ids != 0).long()
    keep = ids != 9; keep[1, 1] = True
    ni, na, _, pos = shorten_rows(ids, am, keep, 0)
    assert ni.tolist() == [[0, 5, 6], [7, 9, 8]] and na.tolist() == [[0, 1, 1], [1, 1, 1]]
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    ni, na, _, _ = shorten_rows(ids, None, torch.tensor([[1, 0, 1], [1, 0, 1]]).bool(), 0)
    assert na is None and torch.equal(ni, torch.tensor([[0, 6], [7, 9]]))


def test_image_rows():
    assert image_rows([16, 0, 32], [16, 16, 16]) == [0, 2, 2]
    assert image_rows([7, 5], [3, 4, 5]) == [0, 0, 1]
    for per_row, per_img in (([16], [16, 16]), ([16, 16], [16]), ([10], [16])):
        with pytest.raises(ValueError, match="do not match"): image_rows(per_row, per_img)


def test_splice_generated():
    orig = torch.tensor([[1, 9, 9, 9, 2], [0, 1, 9, 9, 2]])
    out = torch.tensor([[1, 9, 2, 7, 8], [1, 9, 2, 5, 6]])
    assert torch.equal(splice_generated(out, orig, 3), torch.tensor([[1, 9, 9, 9, 2, 7, 8], [0, 1, 9, 9, 2, 5, 6]]))
    d = GenerateDecoderOnlyOutput(sequences=out.repeat_interleave(2, 0))
    d = splice_generated(d, orig, 3)
    assert d.sequences.shape == (4, 7) and torch.equal(d.sequences[:2, :5], orig[[0, 0]])


def test_pad_token_id_avoids_image_token(llava):
    model, proc, inputs = llava
    assert pad_token_id(model, inputs["input_ids"], inputs["attention_mask"], avoid=(4,)) == 0
    assert pad_token_id(model, inputs["input_ids"], None, avoid=(0, 4)) not in (0, 4)


def test_run_policy_checks_outputs():
    ts = [TokenSet(torch.randn(8, 4)), TokenSet(torch.randn(6, 4))]
    assert [s.tolist() for s in run_policy(lambda t: torch.tensor([[0, 3], [1, -1]]), ts)] == [[0, 3], [1]]
    for bad in (torch.tensor([[3, 0], [1, 2]]), torch.tensor([[0, 8], [1, 2]]), torch.tensor([[0, 0], [1, 2]]),
                torch.tensor([[-1, -1], [1, 2]])):
        with pytest.raises(ValueError, match="policy"): run_policy(lambda t: bad, ts)
    with pytest.raises(ValueError, match="image 1 has 6 visual tokens"): run_policy(RandomPrune(keep=7), ts)


def test_check_policy_inputs_needs():
    class P:
        needs = frozenset({"clip_feats"})
        def __call__(self, ts): return torch.arange(1)
    with pytest.raises(ValueError, match="`clip`"): check_policy_inputs(P())
    with pytest.raises(ValueError, match="visual_projection"): check_policy_inputs(P(), clip=object())
    P.needs = frozenset({"nonsense"})
    with pytest.raises(ValueError, match="subset"): check_policy_inputs(P())


# ---------------------------------------------------------------- lookup
def test_adapter_lookup(llava):
    model = llava[0]
    assert adapter_class(model) is LlavaAdapter
    assert all(f.adapter.family is f for f in families().values())
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"): adapter_class(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not supported"):
        with pruned(torch.nn.Linear(2, 2), RandomPrune(keep=0.5)): pass
    Sub = type("MyLlava", (type(model),), {})
    assert adapter_class(Sub.__new__(Sub)) is LlavaAdapter     # subclasses are found through the MRO


def test_inject_imports_no_adapter():
    import subprocess, sys
    code = "import sys, tokprune_nb.inject; print(any(m.startswith('tokprune_nb.adapters.') and m != 'tokprune_nb.adapters.base' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---------------------------------------------------------------- the context
def test_wrappers_keep_signatures_and_restore(llava):
    model, proc, inputs = llava
    sig_f, sig_g = inspect.signature(model.forward), inspect.signature(model.generate)
    with pruned(model, RandomPrune(keep=0.5)) as ctx:
        assert "forward" in model.__dict__ and "generate" in model.__dict__
        assert inspect.signature(model.forward) == sig_f and inspect.signature(model.generate) == sig_g
        assert type(model.model).forward is not model.forward
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert type(model).__dict__["forward"] is type(model).forward   # the class was never touched


def test_existing_instance_forward_is_restored(llava):
    model, proc, inputs = llava
    mine = model.forward                          # e.g. what accelerate's hooks install
    model.forward = mine
    try:
        with pruned(model, RandomPrune(keep=0.5)):
            assert model.forward is not mine
            model(**inputs)
        assert model.__dict__["forward"] is mine
    finally: del model.forward


def test_nested_is_an_error_and_leaves_outer_intact(llava):
    model, proc, inputs = llava
    with pruned(model, RandomPrune(keep=0.5)):
        with pytest.raises(ValueError, match="nesting"):
            with pruned(model, RandomPrune(keep=0.25)): pass
        model(**inputs)
        assert [s.numel() for s in last_selection(model)] == [8, 8, 8]
    assert "forward" not in model.__dict__


def test_other_instances_unaffected(llava):
    model, proc, inputs = llava
    other, _ = tiny_llava(seed=1)
    ref = other(**inputs).logits
    with pruned(model, RandomPrune(keep=0.25)):
        assert torch.equal(other(**inputs).logits, ref) and last_selection(other) is None


def test_positional_args_and_labels(llava):
    model, proc, inputs = llava
    labels = inputs["input_ids"].clone(); labels[inputs["attention_mask"] == 0] = -100
    with pruned(model, RandomPrune(keep=1.0)):
        a = model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels=labels)
    b = model(**inputs, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    with pruned(model, RandomPrune(keep=0.25)) as ctx:
        out = model(**inputs, labels=labels)
        short_labels = ctx.last.kwargs["labels"]
    assert out.loss is not None and short_labels.shape == ctx.last.kwargs["input_ids"].shape
    assert int((short_labels == 4).sum()) == 3 * 4   # labels of the dropped image tokens went with them


def test_gradients_flow_through_kept_features(llava):
    model, proc, inputs = llava
    with torch.enable_grad():
        with pruned(model, RandomPrune(keep=0.25)):
            out = model(**inputs)
        out.logits.sum().backward()
    g = model.model.multi_modal_projector.linear_1.weight.grad
    assert g is not None and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_generate_lengths_and_dict_outputs(llava):
    model, proc, inputs = llava
    L = inputs["input_ids"].shape[1]
    with pruned(model, RandomPrune(keep=0.25)):
        g = model.generate(**inputs, max_length=L + 3, do_sample=False)     # max_length counts the ORIGINAL prompt
        d = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        pos = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             attention_mask=inputs["attention_mask"], max_new_tokens=3, do_sample=False)
    assert g.shape == (3, L + 3) and torch.equal(g, d.sequences) and torch.equal(g, pos)
    assert len(d.scores) == 3
    assert beams.shape == (6, L + 3) and torch.equal(beams[:, :L], inputs["input_ids"].repeat_interleave(2, 0))


def test_decoding_with_cache_passes_through(llava):
    "A manual decoding step (past_key_values, no pixels) inside the context is not re-pruned."
    model, proc, inputs = llava
    with pruned(model, RandomPrune(keep=0.25)) as ctx:
        out = model(**inputs, use_cache=True)
        am = ctx.last.kwargs["attention_mask"]
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, past_key_values=out.past_key_values,
                     attention_mask=torch.cat([am, torch.ones_like(nxt)], 1))
        assert ctx.calls == 1 and step.logits.shape[1] == 1


def test_inputs_embeds_rejected(llava):
    model, proc, inputs = llava
    with pruned(model, RandomPrune(keep=0.25)):
        with pytest.raises(ValueError, match="inputs_embeds"):
            model(inputs_embeds=torch.zeros(1, 3, 32), pixel_values=inputs["pixel_values"][:1])


def test_custom_adapter_protocol(llava, monkeypatch):
    "A third-party adapter may override `prepare` -> Prepared entirely; contexts are entered around the call."
    model, proc, inputs = llava
    events = []

    class Ctx:
        def __enter__(self): events.append("enter")
        def __exit__(self, *a): events.append("exit")

    class Echo(Adapter):
        model_classes = ("LlavaForConditionalGeneration",)
        def prepare(self, policy, inputs, *, for_generate):
            events.append(("prepare", for_generate))
            return Prepared(kwargs=dict(inputs), selection=[torch.arange(16)] * 3, orig_input_ids=inputs["input_ids"],
                            short_len=inputs["input_ids"].shape[1], contexts=[Ctx()])

    import dataclasses
    fam = families()["LlavaForConditionalGeneration"]
    monkeypatch.setitem(FAMILIES, "LlavaForConditionalGeneration", dataclasses.replace(fam, adapter=Echo))
    ref = model(**inputs).logits
    with pruned(model, RandomPrune(keep=1.0)):
        assert torch.equal(model(**inputs).logits, ref)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert events == [("prepare", False), "enter", "exit", ("prepare", True), "enter", "exit"]

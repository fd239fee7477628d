"Explorer widgets, headless: build them, move the controls from code, check that the outputs follow."
import numpy as np
import pytest
import torch

from tokprune_nb import POLICIES
from tokprune_nb.apps import widgets as W
from tokprune_nb.toyworld import load_toy, make_examples, render


@pytest.fixture(scope="module")
def ex():
    return W.Explorer(seed=0)


def test_explorer_reference_and_run(ex):
    assert ex.reference["kept"] == 144 and ex.reference["selection"] is None
    r = ex.run("zspaprune", 0.11)
    assert r["kept"] == 16 and r["selection"].numel() == 16
    assert r["llm_flops"] < ex.reference["llm_flops"] / 3
    assert r["tokenset"] is not None and tuple(r["tokenset"].grid) == (12, 12)
    with pytest.raises(ValueError, match="`policy`"): ex.run("nope", 0.1)


def test_model_unchanged_after_run(ex):
    before = ex._generate()
    ex.run("random", 0.05)
    assert torch.equal(ex._generate(), before)
    assert "get_image_features" not in vars(ex.model.model)   # the vision cache is removed on exit


def test_vision_pass_is_cached(ex):
    ex.run("random", 0.5)    # fills the cache for the injection's call
    calls = []
    orig = ex.model.model.vision_tower.forward
    ex.model.model.vision_tower.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        ex.run("zspaprune", 0.25); ex.run("zspaprune", 0.11); ex.run("atp", 0.11, alpha=0.3)
    finally: del ex.model.model.vision_tower.forward
    assert len(calls) == 0   # all three served from the cache


def test_slider_moves_change_outputs(ex):
    ui = W.explore(explorer=ex)
    c, o = ui.controls, ui.outputs
    assert ui.state["res"]["kept"] == 16
    img0, info0 = o["image"].value, o["info"].value
    c["keep"].value = 0.5
    assert ui.state["res"]["kept"] == 72 and o["image"].value != img0 and o["info"].value != info0
    assert "tp-kept'>72<" in o["info"].value
    # knob visibility follows the policy
    c["policy"].value = "atp"
    assert c["alpha"].layout.display is None and c["relevance_frac"].layout.display == "none"
    img1 = o["image"].value
    c["alpha"].value = 0.0
    assert ui.state["res"]["policy"].alpha == 0.0 and o["image"].value != img1
    c["heatmap"].value = True
    assert "ATP score" in o["heat_label"].value
    c["policy"].value = "zspaprune"; c["heatmap"].value = False
    assert c["relevance_frac"].layout.display is None
    c["relevance_frac"].value = 1.0
    assert ui.state["res"]["policy"].relevance_frac == 1.0


def test_answer_text_follows_the_budget():
    "Somewhere among a few held-out scenes, cutting the budget to 3 random tokens changes the answer shown."
    toy = load_toy()
    changed = 0
    for e in make_examples("test", 14, seed=2):
        ex = W.Explorer(toy.llava, toy.processor, render(e.scene), e.question, clip=toy.clip,
                        clip_tokenizer=toy.clip_tokenizer, max_new_tokens=1)
        ui = W.explore(explorer=ex, policy="random", keep=1.0)
        a0 = ui.state["res"]["answer"]
        assert a0 == ex.reference["answer"]            # keep 1.0 is the unpruned model
        ui.controls["keep"].value = 0.02
        if ui.state["res"]["answer"] != a0:
            changed += 1
            assert f"tp-answer'>{ui.state['res']['answer']}<" in ui.outputs["info"].value
    assert changed >= 3


def test_compare_and_overlay(ex):
    c = W.compare(explorer=ex, policies=("zspaprune", "random"), keep=0.11)
    assert len(c.children[1].children) == 2
    with pytest.raises(ValueError, match="unknown policy"): W.compare(explorer=ex, policies=("zspaprune", "x"))
    img = render(make_examples("test", 1, seed=0)[0].scene)
    a, b = W.overlay(img, (12, 12), kept=[0, 1]), W.overlay(img, (12, 12), kept=[0, 2])
    assert a.shape == (288, 288, 3) and not np.array_equal(a, b)


def test_bad_arguments():
    toy = load_toy()
    with pytest.raises(ValueError, match="`processor`"): W.Explorer(toy.llava)
    with pytest.raises(ValueError, match="`image`"): W.Explorer(toy.llava, toy.processor)
    with pytest.raises(TypeError, match="`image`"): W.Explorer(toy.llava, toy.processor, np.zeros((4, 4)), "q")

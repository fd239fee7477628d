"Toy world: scene generator, questions, splits, tokenizer/processor, shipped weights."
import importlib, json
from dataclasses import asdict
import numpy as np
import pytest
import torch

from tokprune_nb import toyworld as tw
from tokprune_nb.toyworld.models import _tower_tokens, _lm_hidden


def test_package_reexports_the_modules():
    "`tokprune_nb.toyworld` is a package of five modules; it re-exports each public name, defined in exactly one."
    mods = [tw.data, tw.models, tw.train, tw.evaluate, tw.io]
    names = [n for m in mods for n in m.__all__]
    assert len(names) == len(set(names)) >= 67 and sorted(tw.__all__) == sorted(names)
    for m in mods:
        for n in m.__all__: assert getattr(tw, n) is getattr(m, n), n
    assert importlib.import_module("tokprune_nb.toyworld").main is tw.train.main   # `tokprune train-toy`
    assert (tw.assets_dir() / "toy.json").exists() and (tw.assets_dir() / "llava" / "config.json").exists()


def test_split_disjoint_and_complete():
    parts = [set(tw.scan_split(s).tolist()) for s in tw.SPLITS]
    assert sum(map(len, parts)) == 1797
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    _, y = tw.digit_scans()
    for s in tw.SPLITS:   # stratified: every digit in every split
        assert set(y[tw.scan_split(s)].tolist()) == set(range(10))


def test_bad_split_and_qtype():
    with pytest.raises(ValueError, match="`split`"): tw.scan_split("dev")
    with pytest.raises(ValueError, match="`qtype`"): tw.make_example(np.random.RandomState(0), "train", "size")


def test_scenes_use_their_split_only():
    test_scans = set(tw.scan_split("test").tolist())
    for e in tw.make_examples("test", 50, seed=7):
        assert all(d.scan in test_scans for d in e.scene.digits)


def test_deterministic():
    a, b = tw.make_examples("val", 21, seed=5), tw.make_examples("val", 21, seed=5)
    assert [(x.question, x.answer) for x in a] == [(x.question, x.answer) for x in b]
    assert all(np.array_equal(tw.render(x.scene), tw.render(y.scene)) for x, y in zip(a, b))
    # prefixes are stable
    c = tw.make_examples("val", 7, seed=5)
    assert [(x.question, x.answer) for x in c] == [(x.question, x.answer) for x in a[:7]]
    d = tw.make_examples("val", 21, seed=6)
    assert [(x.question, x.answer) for x in d] != [(x.question, x.answer) for x in a]


def _digit_in(q): return int(next(w for w in q.split() if w.isdigit()))


def test_answers_are_correct():
    for e in tw.make_examples("train", 700, seed=11):
        ls, ds = e.scene.labels, e.scene.digits
        assert len(set(ls)) == len(ls) and tw.MIN_DIGITS <= len(ls) <= tw.MAX_DIGITS
        assert len({d.cell for d in ds}) == len(ds)
        if e.qtype == "color": assert e.answer == e.scene.find(_digit_in(e.question)).color
        elif e.qtype == "row": assert e.answer == str(e.scene.find(_digit_in(e.question)).cell[0] + 1)
        elif e.qtype == "present": assert _digit_in(e.question) in ls and e.answer == "yes"
        elif e.qtype == "absent": assert _digit_in(e.question) not in ls and e.answer == "no"
        elif e.qtype == "count": assert e.answer == str(len(ls))
        elif e.qtype == "count_color":
            c = e.question.split()[2]
            assert e.answer == str(sum(d.color == c for d in ds))
        elif e.qtype == "largest": assert e.answer == str(max(ls))
        assert e.family == tw.QUESTION_TYPES[e.qtype]


def test_answer_balance():
    ex = tw.make_examples("train", 1400, seed=2)
    by = {}
    for e in ex: by.setdefault(e.qtype, []).append(e.answer)
    assert {t: len(v) for t, v in by.items()} == {t: 200 for t in tw.QUESTION_TYPES}
    for t in ("color", "row", "count", "count_color", "largest"):
        _, counts = np.unique(by[t], return_counts=True)
        assert counts.min() >= 0.4 * counts.max(), (t, counts)


def test_render_and_targets():
    e = tw.make_examples("test", 1, seed=0)[0]
    img = tw.render(e.scene)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    tg = tw.patch_targets(e.scene)
    assert all(v.shape == (144,) for v in tg.values())
    fg = tg["digit"] < 10
    assert set(tg["obj"][fg].tolist()) <= set(range(len(e.scene.digits)))
    # every patch marked as a digit has ink of that digit's colour
    for i in np.nonzero(fg)[0]:
        r, c = divmod(int(i), 12)
        patch = img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1, 3).astype(int)
        assert patch.max() > 0


def test_tokenizer_and_processor_round_trip(tmp_path):
    proc = tw.toy_processor()
    ex = tw.make_examples("test", 3, seed=1)
    imgs = [tw.render(e.scene) for e in ex]
    inp = proc(images=imgs, text=[e.prompt for e in ex], return_tensors="pt", padding=True)
    img_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (inp["input_ids"] == img_id).sum(1).tolist() == [144] * 3
    assert inp["pixel_values"].shape == (3, 3, 96, 96)
    torch.testing.assert_close(inp["pixel_values"], tw.pixel_values(imgs), atol=1e-5, rtol=0)
    text = proc.tokenizer.decode(inp["input_ids"][0], skip_special_tokens=True)
    assert text.split() == ex[0].prompt.replace("<image>", "").split()
    proc.save_pretrained(tmp_path)
    from transformers import LlavaProcessor
    again = LlavaProcessor.from_pretrained(tmp_path)
    inp2 = again(images=imgs, text=[e.prompt for e in ex], return_tensors="pt", padding=True)
    assert torch.equal(inp["input_ids"], inp2["input_ids"])
    torch.testing.assert_close(inp["pixel_values"], inp2["pixel_values"])
    ctok = tw.toy_tokenizer("right", clip=True)
    ids = ctok(["the 7"]).input_ids[0]
    assert ids[0] == ctok.bos_token_id and ids[-1] == ctok.eos_token_id == 3


def _toy_texts()->list:
    "Every word alone and together, a few hundred questions/prompts/answers and CLIP captions, and some edge cases."
    from tokprune_nb.toyworld.train import dense_captions, scene_caption
    texts = list(tw.WORDS) + [" ".join(tw.WORDS), " ".join(reversed(tw.WORDS))]
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        for e in tw.make_examples(split, 70, seed=seed):
            texts += [e.question, e.prompt, f"{e.prompt} {e.answer} </s>", scene_caption(e.scene)]
    rng = np.random.RandomState(0)
    for _ in range(20): texts += dense_captions(rng)[0]
    texts += ["", "   ", "zebra", "the zebra 7 ?", "what color is the 7?", "USER:what", "red\n\t7  blue",
              "<image>" * 3, "USER: <image>7 ASSISTANT:", "<s>the</s>", "<pad> <unk> 12 Red",
              "USER: " + "<image> " * 144 + "what color is the 7 ? ASSISTANT:"]
    return texts


@pytest.mark.parametrize("clip", [False, True])
def test_toy_tokenizer_matches_the_shipped_one(clip):
    "`toy_tokenizer` (now a call of `word_tokenizer`) = the tokenizer saved with the shipped model: ids, masks, specials, decode."
    from transformers import PreTrainedTokenizerFast
    d = tw.assets_dir() / ("clip" if clip else "llava")
    saved = PreTrainedTokenizerFast.from_pretrained(d)   # as `load_toy` loads it (the processor's tokenizer: same files)
    raw = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token="<pad>")   # tokenizer.json alone
    new = tw.toy_tokenizer("right", clip=True) if clip else tw.toy_tokenizer()
    assert new.padding_side == saved.padding_side == ("right" if clip else "left")
    assert new.model_max_length == saved.model_max_length == 512
    assert new.get_vocab() == saved.get_vocab() == raw.get_vocab() == {w: i for i, w in enumerate(tw.WORDS)}
    for k in ("bos", "eos", "pad", "unk"):
        assert getattr(new, f"{k}_token") == getattr(saved, f"{k}_token"), k
        assert getattr(new, f"{k}_token_id") == getattr(saved, f"{k}_token_id"), k
    assert (new.bos_token_id, new.eos_token_id, new.pad_token_id, new.unk_token_id) == (1, 3, 0, 2)
    assert new.image_token == saved.image_token == "<image>" and new.image_token_id == saved.image_token_id == 4
    assert new.all_special_tokens == saved.all_special_tokens and new.all_special_ids == saved.all_special_ids
    assert {i: str(t) for i, t in new.added_tokens_decoder.items()} == {i: str(t) for i, t in saved.added_tokens_decoder.items()}
    texts = _toy_texts()
    assert len(texts) > 1000
    for t in texts:   # one at a time: ids, mask, tokens, decode (with and without specials)
        a, b, c = new(t), saved(t), raw(t)
        assert a.input_ids == b.input_ids == c.input_ids and a.attention_mask == b.attention_mask == c.attention_mask, t
        assert new.convert_ids_to_tokens(a.input_ids) == saved.convert_ids_to_tokens(b.input_ids), t
        for skip in (False, True):
            assert new.decode(a.input_ids, skip_special_tokens=skip) == saved.decode(b.input_ids, skip_special_tokens=skip), t
    for side in ("left", "right"):   # batched with padding, both sides
        for i in range(0, len(texts), 97):
            chunk = texts[i:i + 97]
            a, b, c = (tok(chunk, padding=True, padding_side=side, return_tensors="pt") for tok in (new, saved, raw))
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], c["input_ids"])
            assert torch.equal(a["attention_mask"], b["attention_mask"]) and torch.equal(a["attention_mask"], c["attention_mask"])
            pads = a["attention_mask"] == 0
            assert pads.any() and (a["input_ids"][pads] == 0).all()
            assert (pads[:, 0] if side == "left" else pads[:, -1]).any()
            for skip in (False, True):
                assert new.batch_decode(a["input_ids"], skip_special_tokens=skip) == saved.batch_decode(b["input_ids"], skip_special_tokens=skip)
    long = " ".join(["red 7"] * 400)   # past model_max_length: the same truncation
    assert new(long, truncation=True).input_ids == saved(long, truncation=True).input_ids
    assert len(new(long, truncation=True).input_ids) == 512


def test_lm_inputs_match_generate():
    "The training forward (`lm_inputs`) is the processor -> generate path, bit for bit (random model)."
    clip, llava = tw.build_toy(0)
    proc = tw.toy_processor()
    ex = tw.make_examples("val", 3, seed=5)
    inp = proc(images=[tw.render(e.scene) for e in ex], text=[e.prompt for e in ex], return_tensors="pt", padding=True)
    with torch.no_grad():
        g = llava.generate(**inp, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        z = llava.model.multi_modal_projector(_tower_tokens(llava, inp["pixel_values"]))
        mine = llava.lm_head(_lm_hidden(llava, tw.lm_inputs(llava, z, [[e] for e in ex]))[:, -1])
    torch.testing.assert_close(mine, g.scores[0], atol=1e-5, rtol=1e-5)


def test_dropout_keeps_every_object():
    e = tw.make_examples("train", 1, seed=3)[0]
    obj = tw.patch_targets(e.scene)["obj"]
    for k in (12, 40, 144):
        kept = tw.dropout_keep(obj, k, np.random.RandomState(k))
        assert len(kept) == max(k, len(set(obj[obj >= 0].tolist()))) and np.all(np.diff(kept) > 0)
        assert set(obj[obj >= 0].tolist()) <= set(obj[kept].tolist())


@pytest.fixture(scope="module")
def toy():
    return tw.load_toy()


def test_shipped_model_loads_and_answers(toy):
    assert type(toy.llava).__name__ == "LlavaForConditionalGeneration" and type(toy.clip).__name__ == "CLIPModel"
    meta = toy.meta
    assert {"seed", "recipe", "commit"} <= set(meta)
    # the LLaVA tower is the CLIP vision model
    sd = toy.clip.vision_model.state_dict()
    tower = toy.llava.model.vision_tower
    for k, v in getattr(tower, "vision_model", tower).state_dict().items(): assert torch.equal(v, sd[k]), k
    ex = tw.make_examples("test", 28, seed=123)
    acc = tw.accuracy_table(ex, tw.predict(toy.llava, toy.processor, ex))
    assert acc["accuracy"] >= 0.8, acc


def test_shipped_model_meets_the_accuracy_targets(toy):
    "The issue's targets, re-measured here: >= 95% overall and >= 90% per type on the 700 held-out test questions."
    test = tw.make_examples("test", 700, seed=0)   # the set `train_toy` reports on
    acc = tw.accuracy_table(test, tw.predict(toy.llava, toy.processor, test))
    assert acc["accuracy"] >= 0.95, acc
    assert min(acc["by_type"].values()) >= 0.90, acc["by_type"]
    # and the numbers recorded in toy.json at training time are these
    assert acc["accuracy"] == pytest.approx(toy.meta["test"]["accuracy"]), (acc, toy.meta["test"])
    # trained with the defaults (fields added to `Recipe` after it was trained default to what it was trained with)
    assert {**asdict(tw.Recipe()), **toy.meta["recipe"]} == {**asdict(tw.Recipe()), "seed": toy.meta["seed"]}


def test_shipped_model_answers_from_evidence(toy):
    """Toy world v2: keeping every digit patch and dropping background (the oracle) at keep 0.5 and 0.25 stays within
    3 points of the full model on every question type (700 held-out questions); random pruning at 0.11 loses >= 15."""
    from tokprune_nb.apps.demo import evaluate, make_policy
    test = tw.make_examples("test", 700, seed=0)
    full = evaluate(toy, test)["accuracy_by_type"]
    for keep in (0.5, 0.25):
        orc = evaluate(toy, test, make_policy("oracle", keep))["accuracy_by_type"]
        gaps = {t: round(orc[t] - full[t], 3) for t in full}
        assert all(abs(g) <= 0.03 + 1e-9 for g in gaps.values()), (keep, gaps)
    rnd = evaluate(toy, test, make_policy("random", 0.11))
    assert np.mean(list(full.values())) - rnd["accuracy"] >= 0.15


def test_independent_dropout_decorrelates_the_digit_share():
    "v2's dropout: every digit keeps a token, and the digit share of the kept tokens ranges far beyond a full image's."
    from tokprune_nb.toyworld.train import dropout_independent, dropout_keep
    e = tw.make_examples("val", 1, seed=2)[0]
    obj = tw.patch_targets(e.scene)["obj"]
    full = (obj >= 0).mean(); rng = np.random.RandomState(0)
    v2 = [(obj[dropout_independent(obj, rng)] >= 0).mean() for _ in range(300)]
    v1 = [(obj[dropout_keep(obj, int(rng.randint(12, 145)), rng)] >= 0).mean() for _ in range(300)]
    assert np.std(v2) > 2 * np.std(v1)              # v1 keeps the share near the full image's, v2 does not
    assert max(v2) > 0.9 and min(v2) < full
    for _ in range(50):
        k = dropout_independent(obj, rng)
        assert set(obj[obj >= 0].tolist()) <= set(obj[k].tolist()) and np.all(np.diff(k) > 0)
    with pytest.raises(ValueError, match="dropout"): tw.Recipe(dropout="nope")
    with pytest.raises(ValueError, match="drop_prob"): tw.Recipe(drop_prob=1.5)


def test_background_keep_power():
    "`bg_keep_power` skews the background survival rate U(0,1)**p towards small rates; p = 1 is the v2 dropout itself."
    from tokprune_nb.toyworld.train import dropout_independent
    e = tw.make_examples("val", 1, seed=2)[0]
    obj = tw.patch_targets(e.scene)["obj"]; n_bg = (obj < 0).sum()
    def bg_share(p, seed=0):
        rng = np.random.RandomState(seed)
        return np.mean([(obj[dropout_independent(obj, rng, 0.3, 1.0, p)] < 0).sum() / n_bg for _ in range(400)])
    for s in range(5):   # p = 1: the same draws, the same tokens, as before the parameter existed
        assert np.array_equal(dropout_independent(obj, np.random.RandomState(s), 0.3, 1.0),
                              dropout_independent(obj, np.random.RandomState(s), 0.3, 1.0, 1.0))
    s1, s2 = bg_share(1.0), bg_share(2.0)
    assert abs(s1 - 0.5) < 0.05 and abs(s2 - 1 / 3) < 0.05, (s1, s2)   # E[U] = 1/2, E[U^2] = 1/3
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="bg_keep_power"): tw.Recipe(bg_keep_power=bad)


def test_load_toy_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-toy"): tw.load_toy(tmp_path)


def test_train_toy_quick(tmp_path):
    "The CLI runs end to end (a few steps) and writes a loadable model with its recipe."
    assert tw.main(["--quick", "--out", str(tmp_path / "m"), "--n-test", "7", "--bg-keep-power", "1.5", "--drop-prob", "0.5"]) == 0
    t = tw.load_toy(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "toy.json").read_text())
    assert meta["recipe"]["vision_steps"] == 5 and meta["seed"] == tw.Recipe().seed and meta["commit"]
    assert meta["recipe"]["bg_keep_power"] == 1.5 and meta["recipe"]["drop_prob"] == 0.5   # --quick keeps the flags
    assert type(t.llava).__name__ == "LlavaForConditionalGeneration"


def test_projector_targets_and_codes():
    "A digit's visual token target is E[digit] + E[colour] + row code + column code; background gets its own code."
    clip, llava = tw.build_toy(0)
    E = llava.get_input_embeddings().weight.detach()
    torch.testing.assert_close(E.norm(dim=-1), torch.ones(E.shape[0]))   # unit-norm word vectors
    codes = tw.visual_codes(llava, 0)
    assert codes.shape == (2 * tw.GRID + 1, llava.config.text_config.hidden_size)
    torch.testing.assert_close(codes, tw.visual_codes(llava, 0))       # seeded
    e = tw.make_examples("test", 1, seed=4)[0]
    tg = {k: torch.from_numpy(v)[None] for k, v in tw.patch_targets(e.scene).items()}
    t = tw.projector_targets(tg, E, codes)
    fg = tg["digit"][0] < 10
    torch.testing.assert_close(t[0, ~fg], codes[-1].expand(int((~fg).sum()), -1))
    i = int(torch.nonzero(fg)[0])
    d = e.scene.digits[int(tg["obj"][0, i])]
    want = (E[tw.WORDS.index(str(d.label))] + E[tw.WORDS.index(d.color)] + codes[d.cell[0]] + codes[tw.GRID + d.cell[1]])
    torch.testing.assert_close(t[0, i], want)
    assert float(tw.align_loss(t, tg, E, codes)) == 0.0
    assert float(tw.align_loss(t + 0.1, tg, E, codes)) > 0


def test_lm_schedule():
    r = tw.Recipe(warm_steps=10, warm_keep=16, ramp_steps=20)
    assert tw.lm_schedule(0, r) == (["color"], 16, False)
    types, k, drop = tw.lm_schedule(20, r)
    assert types == list(tw.QUESTION_TYPES) and 16 < k < 144 and not drop
    assert tw.lm_schedule(30, r) == (list(tw.QUESTION_TYPES), None, True)


def test_training_ignores_global_grad_mode(tmp_path):
    "Notebooks often call torch.set_grad_enabled(False); training must still train."
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try: assert tw.main(["--quick", "--out", str(tmp_path / "m"), "--n-test", "7"]) == 0
    finally: torch.set_grad_enabled(prev)


def test_turn_weights():
    types = list(tw.QUESTION_TYPES)
    assert tw.turn_probs(types) is None and tw.turn_probs(types, {}) is None
    p = tw.turn_probs(types, {"count": 3, "count_color": 3})
    assert p.sum() == pytest.approx(1.0) and p[types.index("count")] == pytest.approx(3 / 11)
    assert p[types.index("color")] == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="unknown question types"): tw.Recipe(turn_weights={"cnt": 2})
    with pytest.raises(ValueError, match="must be > 0"): tw.Recipe(turn_weights={"count": 0})
    assert tw.Recipe(turn_weights={"count": 3}).turn_weights == {"count": 3}

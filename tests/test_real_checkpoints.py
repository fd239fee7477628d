"""Real checkpoints, every registered family (flag `hf`): skipped unless the family's local checkpoint directory is named
by its environment variable (`registry.checkpoint_env`, e.g. TOKPRUNE_QWEN3_5_PATH; Qwen2.5-VL also TOKPRUNE_QWEN_PATH).
Nothing is downloaded. Each run checks, on one image and one question through the checkpoint's own processor and chat
template: keep=1.0 is bit-identical to the unwrapped model (greedy generate), and at keep=0.25 the LM receives exactly the
budget of every image's prunable tokens and generates."""
import pytest
import torch
from tokprune_nb.registry import families, checkpoint_env, checkpoint_path
from tokprune_nb.inject import pruned, last_selection
from tokprune_nb.policies import RandomPrune, ZSPAPrune
from tokprune_nb.testing.tiny import tiny_images

FAMS = list(families().values())
GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("f", FAMS, ids=lambda f: f.name)
def test_real_checkpoint(f):
    path = checkpoint_path(f)
    if path is None: pytest.skip(f"{checkpoint_env(f)} not set: no local {f.class_name} checkpoint")
    from transformers import AutoProcessor
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = f.hf_class().from_pretrained(path, dtype=dtype).to(dev).eval()
    proc = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    x = proc(text=[text], images=[tiny_images(1, size=(448, 448))], return_tensors="pt").to(dev)
    for k, v in list(x.items()):
        if torch.is_tensor(v) and v.is_floating_point(): x[k] = v.to(dtype)
    with torch.no_grad():
        ref = model.generate(**x, **GEN)
        with pruned(model, RandomPrune(keep=1.0)):
            assert torch.equal(model.generate(**x, **GEN), ref)
        full = [len(s) for s in last_selection(model)]
        policy = ZSPAPrune(keep=0.25)
        with pruned(model, policy) as ctx:
            out = model.generate(**x, **GEN)
    assert [len(s) for s in last_selection(model)] == [policy.budget(n) for n in full]
    assert out.shape[1] > x["input_ids"].shape[1]
    assert torch.equal(out[:, :x["input_ids"].shape[1]], x["input_ids"])

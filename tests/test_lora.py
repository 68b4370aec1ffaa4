import pytest
import torch

from pocketllm.lora import (LoraSpec, apply_lora, default_targets, load_adapter, lora_parameters,
                            merge_lora, save_adapter)
from pocketllm.models import load_model
from tests.helpers import TEXTS, tiny_batch


def _trained_lora(name):
    model, tok = load_model(name)
    torch.manual_seed(0)
    spec = LoraSpec(r=4, alpha=8, targets=default_targets(model))
    apply_lora(model, spec)
    with torch.no_grad():  # a non-zero B so the adapter changes the output
        for _, p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    return model, tok, spec


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_peft_loads_our_adapter_with_same_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok, spec = _trained_lora(name)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    save_adapter(model, tmp_path, spec, base_model=name)
    base, _ = load_model(name)
    with torch.no_grad():
        plain = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter does something
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path))
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_round_trip_and_merge(tmp_path):
    model, tok, spec = _trained_lora("tiny-llama")
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        ref = model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits
    save_adapter(model, tmp_path, spec, base_model="tiny-llama")
    again, _ = load_model("tiny-llama")
    assert load_adapter(again, tmp_path) == spec
    with torch.no_grad():
        got = again(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits
        assert torch.equal(got, ref)
        merge_lora(again)
        assert not any("lora" in n for n, _ in again.named_parameters())
        merged = again(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.allclose(merged, ref, atol=1e-5)


def test_bad_targets_name_what_exists():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(model, LoraSpec(targets=["nope"]))


def test_grouped_forward_equals_per_group_forward():
    model, tok, spec = _trained_lora("tiny-llama")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(6, 5, layer.in_features)
    As = torch.randn(3, spec.r, layer.in_features)
    Bs = torch.randn(3, layer.out_features, spec.r)
    got = layer.forward_groups(x, As, Bs)
    for g in range(3):
        with torch.no_grad():
            layer.lora_A.copy_(As[g])
            layer.lora_B.copy_(Bs[g])
            assert torch.allclose(got[2 * g:2 * g + 2], layer(x[2 * g:2 * g + 2]), atol=1e-5)

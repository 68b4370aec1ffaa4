import pytest
import torch

from pocketllm.lora import (LoraSpec, apply_lora, default_targets, layer_of, load_adapter,
                            lora_modules, lora_parameters, merge_lora, save_adapter, select_layers)
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


# ---- LoRA on some layers (--lora-layers): PEFT's layers_to_transform ------------------------
def _six_layers():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("text,want", [("", None), ("2", [4, 5]), ("6", [0, 1, 2, 3, 4, 5]),
                                       ("0,5", [0, 5]), ("1:3", [1, 2]), ("4:", [4, 5]),
                                       ("-1", [5]), ("-2:", [4, 5]), (" 0, 2:4 ", [0, 2, 3])])
def test_select_layers_reads_the_last_n_or_indices_and_ranges(text, want):
    assert select_layers(_six_layers(), ["q_proj", "v_proj"], text) == want


@pytest.mark.parametrize("text,match", [("7", "last 7 of 6 layers"), ("0", "last 0"),
                                        ("6,", "layers 0..5"), ("a", "layers 0..5"),
                                        ("3:3", "selects no layer")])
def test_select_layers_errors_name_the_flag_and_the_layers(text, match):
    with pytest.raises(ValueError, match="--lora-layers") as e:
        select_layers(_six_layers(), ["q_proj"], text)
    assert match in str(e.value)


def test_layer_of_follows_peft_s_rule():
    assert layer_of("model.layers.3.self_attn.q_proj") == 3
    assert layer_of("transformer.h.11.attn.c_attn") == 11
    assert layer_of("roberta.encoder.layer.2.attention.self.query") == 2
    assert layer_of("lm_head") is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_peft_loads_our_adapter_on_some_layers_with_same_logits(name, tmp_path):
    """Only the last layer adapted: saved as layers_to_transform, which peft reads to adapt the
    same modules; and ours loads back to the same modules and logits."""
    peft = pytest.importorskip("peft")
    model, tok = load_model(name)
    targets = default_targets(model)
    spec = LoraSpec(r=2, alpha=4, targets=targets, layers=select_layers(model, targets, "1"))
    names = apply_lora(model, spec)
    assert names and all(layer_of(n) == 1 for n in names)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    save_adapter(model, tmp_path, spec, base_model=name)
    again, _ = load_model(name)
    assert load_adapter(again, tmp_path) == spec
    assert sorted(lora_modules(again)) == sorted(names)
    with torch.no_grad():
        assert torch.equal(again(input_ids=b["input_ids"],
                                 attention_mask=b["attention_mask"]).logits, ours)
    pm = peft.PeftModel.from_pretrained(load_model(name)[0], str(tmp_path))
    # peft adapts the same layer only (an extra one, B = 0, would not show in the logits)
    adapted = {layer_of(n) for n, _ in pm.named_parameters() if "lora_A" in n}
    assert adapted == {1}
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)

"""The trainable sets (`--trainable`): what each trains, that each saved set loads back to the
same outputs (whichever kind a directory holds), and, through the CLI, that the small sets keep
their best, replay from a ZO log bit for bit and fuse (or refuse to). Each set training and
resuming under every method that takes it: tests/methods/test_conformance.py."""

import re

import pytest
import torch
from safetensors.torch import load_file

from pocketllm.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pocketllm.cli import main
from pocketllm.config import TrainArgs
from pocketllm.models import load_model
from pocketllm.trainable import SAVED, TRAINABLE, load_saved, saved_kind, setup_trainable
from tests.helpers import TEXTS, tiny_batch
from tests.test_cli import DATA, FAST


def _logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_every_saved_kind_is_a_trainable_set():
    assert set(SAVED) == set(TRAINABLE) - {"full"}
    assert all(cls.kind == kind for kind, cls in SAVED.items())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_norm_trains_the_normalisation_scales_and_biases_only(name):
    model, _ = load_model(name)
    spec, params = setup_trainable(model, TrainArgs(model=name, trainable="norm"))
    cfg, names = model.config, [n for n, _ in params]
    layers = cfg.num_hidden_layers
    if name == "tiny-llama":  # RMSNorm: a scale per layer's two norms, and the final one
        assert len(names) == 2 * layers + 1 and all(n.endswith("norm.weight") for n in names)
    else:  # LayerNorm: scale and bias
        assert len(names) == 2 * (2 * layers + 1)
        assert {n.rsplit(".", 1)[1] for n in names} == {"weight", "bias"}
    assert sum(p.numel() for _, p in params) == len(names) * cfg.hidden_size
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in names)


@pytest.mark.parametrize("text,layers", [("0", set()), ("1", {1}), ("0:1", {0}), ("-2", {0})])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_norm_layers_keep_the_final_norm_and_the_named_layers(name, text, layers):
    from pocketllm.lora import layer_of
    from pocketllm.trainable import final_norms
    model, _ = load_model(name)
    _, params = setup_trainable(model, TrainArgs(model=name, trainable="norm",
                                                 norm_layers=text))
    names = [n for n, _ in params]
    final = [n for n in names if layer_of(n) is None]
    (norm_name, norm), = final_norms(model)
    assert final == [f"{norm_name}.{a}" for a, _ in norm.named_parameters()]
    assert {layer_of(n) for n in names} - {None} == layers
    full = setup_trainable(load_model(name)[0], TrainArgs(model=name, trainable="norm"))[1]
    per_layer = (len(full) - len(final)) // model.config.num_hidden_layers
    assert len(names) == len(final) + len(layers) * per_layer


@pytest.mark.parametrize("model,text,match", [
    ("tiny-llama", "3", r"--norm-layers '3': asks for the last 3 of 2 layers"),
    ("tiny-llama", "x", r"--norm-layers 'x': .*layers 0\.\.1"),
    ("tiny-roberta", "0", r"--norm-layers 0: this model has no final norm"),
])
def test_norm_layers_errors_are_one_line(model, text, match):
    m, _ = load_model(model)
    with pytest.raises(SystemExit, match=match):
        setup_trainable(m, TrainArgs(model=model, trainable="norm", norm_layers=text))


# LoRA sized for zeroth-order: on fewer layers (--lora-layers), LoRA-FA, rank 1
LORA_VARIANTS = [{"lora_layers": "1"}, {"lora_layers": "0:1", "lora_fa": True},
                 {"lora_layers": "-1", "lora_rank": 1, "lora_fa": True}]
# a set's own settings where it needs some (head: rows in both chunks of a tiny vocabulary)
NEEDS = {"head": {"head_tokens": "2,9,200"}}
SETS = ([(k, NEEDS.get(k, {})) for k in sorted(SAVED)] + [("lora", v) for v in LORA_VARIANTS]
        + [("norm", {"norm_layers": "0"})])


def _ids(case) -> str:
    return ",".join(map(str, case.values())) if isinstance(case, dict) else str(case)


@pytest.mark.parametrize("trainable,variant", SETS, ids=_ids)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_saved_set_loads_back_to_identical_outputs(name, trainable, variant, tmp_path):
    from pocketllm.lora import lora_modules
    model, tok = load_model(name)
    args = TrainArgs(model=name, trainable=trainable,
                     **{"lora_rank": 2, "num_virtual_tokens": 3, "seed": 4, **variant})
    spec, params = setup_trainable(model, args)
    with torch.no_grad():  # trained: away from the initial values
        for _, p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    b = tiny_batch(tok, TEXTS)
    ref = _logits(model, b)
    spec.save(model, tmp_path, base_model=name)
    assert (tmp_path / ADAPTER_CONFIG).is_file() and (tmp_path / ADAPTER_WEIGHTS).is_file()
    assert saved_kind(tmp_path) == trainable
    fresh, _ = load_model(name)
    assert not torch.equal(_logits(fresh, b), ref)
    assert load_saved(fresh, tmp_path) == spec
    assert sorted(lora_modules(fresh)) == sorted(lora_modules(model))  # the same layers
    assert torch.equal(_logits(fresh, b), ref)


def test_saved_kind_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        saved_kind(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="peft_type 'IA3' is none of LORA, PROMPT_TUNING"):
        saved_kind(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text('{"pocketllm_trainable": "bias"}')
    with pytest.raises(ValueError, match="pocketllm_trainable 'bias' is none of"):
        saved_kind(tmp_path)
    with pytest.raises(SystemExit, match="--adapter-path"):
        main(["eval", "--model", "tiny-llama", "--data", DATA, "--split", "valid",
              "--adapter-path", str(tmp_path)])


def test_a_norm_adapter_does_not_load_into_another_architecture(tmp_path):
    model, _ = load_model("tiny-llama")
    spec, _ = setup_trainable(model, TrainArgs(model="tiny-llama", trainable="norm"))
    spec.save(model, tmp_path, base_model="tiny-llama")
    other, _ = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_saved(other, tmp_path)


# ---- through the CLI: keep the best, replay, eval/generate, fuse ---------------------------
RUN = [*FAST, "--method", "zo-sgd", "--iters", "6", "--steps-per-eval", "2", "--save-every", "3",
       "--keep-best", "--eval-batch-size", "32", "--val-batches", "1", "--num-virtual-tokens", "4"]
# rates that move the tiny model's valid loss within six steps
LR = {"norm": ["--learning-rate", "1.0", "--eps", "1e-2"],
      "prefix": ["--learning-rate", "5e-2", "--eps", "1e-2"]}


@pytest.mark.parametrize("trainable", ["norm", "prefix"])
def test_a_small_set_keeps_its_best_replays_and_loads_in_eval(trainable, tmp_path, capsys):
    from pocketllm.train import read_best
    out = tmp_path / "run"
    assert main(["train", *RUN, "--trainable", trainable, *LR[trainable],
                 "--adapter-path", str(out)]) == 0
    assert "best on valid" in capsys.readouterr().out
    for d in (out, out / "best"):
        assert saved_kind(d) == trainable
    best = read_best(out / "best")
    assert best is not None and best["step"] in (0, 2, 4, 6)
    # the kept set scores on valid what was recorded for it
    assert main(["eval", "--model", "tiny-llama", "--data", DATA, "--split", "valid",
                 "--max-seq-length", "128", "--batch-size", "32", "--max-batches", "1",
                 "--adapter-path", str(out / "best")]) == 0
    loss = float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1))
    assert loss == pytest.approx(best["valid_loss"], abs=2e-4)
    # the ZO log alone rebuilds the final set, bit for bit
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a, b = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (out, rebuilt))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Note:", "--max-tokens", "3",
                 "--adapter-path", str(out)]) == 0


def test_fuse_writes_trained_norms_and_refuses_a_prompt(tmp_path, capsys):
    out = tmp_path / "norm"
    model, tok = load_model("tiny-llama")
    spec, params = setup_trainable(model, TrainArgs(model="tiny-llama", trainable="norm"))
    with torch.no_grad():
        for _, p in params:
            p.mul_(1.5)
    spec.save(model, out, base_model="tiny-llama")
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", "tiny-llama", "--adapter-path", str(out),
                 "--save-path", str(fused)]) == 0
    assert "merged 5 norm layers" in capsys.readouterr().out
    again, _ = load_model(str(fused))
    b = tiny_batch(tok, TEXTS)
    assert torch.allclose(_logits(again, b), _logits(model, b), atol=1e-6)

    prompt = tmp_path / "prompt"
    model, _ = load_model("tiny-llama")
    spec, _ = setup_trainable(model, TrainArgs(model="tiny-llama", trainable="prefix"))
    spec.save(model, prompt, base_model="tiny-llama")
    with pytest.raises(SystemExit, match="cannot be merged"):
        main(["fuse", "--model", "tiny-llama", "--adapter-path", str(prompt),
              "--save-path", str(tmp_path / "no")])


def test_keep_best_is_refused_for_full_parameters_only(tmp_path):
    with pytest.raises(SystemExit, match="not --trainable full"):
        main(["train", *RUN, "--trainable", "full", "--adapter-path", str(tmp_path)])


# ---- LoRA sized for zeroth-order: rank 1, one target, LoRA-FA ----------------------------------
def test_rank_1_lora_fa_on_one_target_trains_b_of_that_target_only(tmp_path):
    """--lora-rank 1 --lora-targets q_proj --lora-fa: one vector per layer trains (B of q_proj,
    A frozen at its seeded init), and a zo-sgd run saves an adapter that loads back."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "4", "--steps-per-eval", "0", "--no-eval-before",
                 "--lora-rank", "1", "--lora-targets", "q_proj", "--lora-fa",
                 "--learning-rate", "1e-2", "--adapter-path", str(out)]) == 0
    import json
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 1 and cfg["target_modules"] == ["q_proj"]
    header = json.loads((out / "zo_log.jsonl").read_text().splitlines()[0])
    model, _ = load_model("tiny-llama")
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert header["params"] == [f"model.layers.{i}.self_attn.q_proj.lora_B"
                                for i in range(layers)]
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    init, _ = load_model("tiny-llama")
    _, params = setup_trainable(init, TrainArgs(model="tiny-llama", lora_rank=1,
                                                lora_targets=["q_proj"], lora_fa=True))
    assert sum(p.numel() for _, p in params) == layers * hidden
    a_init = {n: p for n, p in init.named_parameters() if "lora_A" in n}
    for n, p in a_init.items():  # A as initialised, B moved
        assert torch.equal(saved[f"base_model.model.{n}.weight"], p)
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    assert load_saved(model, out).r == 1


# ---- LoRA on fewer layers (--lora-layers), with LoRA-FA and rank 1 ------------------------------
@pytest.mark.parametrize("variant", LORA_VARIANTS, ids=_ids)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_lora_layers_and_fa_choose_what_trains(name, variant):
    """Only the chosen layers' targets carry an adapter; LoRA-FA trains only their B (A stays
    at its seeded init, saved with B: the round trip above)."""
    from pocketllm.lora import layer_of, lora_modules
    model, _ = load_model(name)
    args = TrainArgs(model=name, trainable="lora", seed=4, **variant)
    spec, params = setup_trainable(model, args)
    want = {"1": 1, "0:1": 0, "-1": model.config.num_hidden_layers - 1}[variant["lora_layers"]]
    assert spec.layers == [want] and {layer_of(n) for n in lora_modules(model)} == {want}
    assert {layer_of(n) for n, _ in params} == {want}
    assert all(".lora_B" in n for n, _ in params) == bool(variant.get("lora_fa"))


def test_lora_layers_through_the_cli_train_replay_eval_generate_fuse(tmp_path, capsys):
    """zo-sgd on the last layer's q_proj/v_proj B factors (LoRA-FA): the log perturbs those
    only; replay rebuilds the adapter bit for bit; eval, generate and fuse load it."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "4", "--steps-per-eval", "0", "--no-eval-before",
                 "--lora-layers", "1", "--lora-fa", "--lora-rank", "2",
                 "--learning-rate", "1e-2", "--adapter-path", str(out)]) == 0
    import json
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["layers_to_transform"] == [1]
    header = json.loads((out / "zo_log.jsonl").read_text().splitlines()[0])
    assert header["params"] == ["model.layers.1.self_attn.q_proj.lora_B",
                                "model.layers.1.self_attn.v_proj.lora_B"]
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a, r = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (out, rebuilt))
    assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a)
    assert len(a) == 4 and all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--data", DATA, "--split", "valid",
                 "--max-batches", "1", "--adapter-path", str(out)]) == 0
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Note:", "--max-tokens", "3",
                 "--adapter-path", str(out)]) == 0
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", "tiny-llama", "--adapter-path", str(out),
                 "--save-path", str(fused)]) == 0
    assert "merged 2" in capsys.readouterr().out
    model, tok = load_model("tiny-llama")
    load_saved(model, out)
    b = tiny_batch(tok, TEXTS)
    assert torch.allclose(_logits(load_model(str(fused))[0], b), _logits(model, b), atol=1e-5)


def test_lora_layers_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --lora-layers '5,': .*layers 0\.\.1"):
        main(["train", *FAST, "--iters", "1", "--lora-layers", "5,",
              "--adapter-path", str(tmp_path)])

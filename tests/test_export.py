"""`pocketllm export` and `generate --engine executorch|onnxruntime`: the exported program's
logits and greedy tokens equal torch's, the adapter's effect survives the export (the program
completes the way training pushed the model, the base does not), the tied embedding is stored
once, and a missing extra or a wrong file is one line.

Exporting is the slow part (tens of seconds under load): one adapter and one export per format
for the module."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pocketllm.cli import main
from pocketllm.export import (FORMATS, NextToken, export, generate_ids, load_runner,
                              merged_model)
from tests.helpers import write_data

PROMPT = "Note: tea at noon\nCategory:"
TARGET = " health"
MAX_LEN = 40


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter that learned to complete PROMPT with TARGET (lora-adam: a few seconds)."""
    d = tmp_path_factory.mktemp("export")
    data = write_data(d / "data", [(PROMPT, TARGET)] * 4, valid=1)
    rc = main(["train", "--model", "tiny-llama", "--data", str(data), "--method", "lora-adam",
               "--iters", "60", "--learning-rate", "2e-2", "--batch-size", "4",
               "--steps-per-eval", "0", "--no-eval-before",
               "--save-every", "0", "--no-keep-best", "--threads", "1",
               "--adapter-path", str(d / "run")])
    assert rc == 0
    return d / "run"


@pytest.fixture(scope="module", params=sorted(FORMATS))
def program(request, adapter, tmp_path_factory):
    fmt = FORMATS[request.param]
    pytest.importorskip({"pte": "executorch", "onnx": "onnxruntime"}[fmt.name],
                        reason=f"the {fmt.name} extra is not installed")
    out = tmp_path_factory.mktemp("prog") / f"m{fmt.suffix}"
    rc = main(["export", "--model", "tiny-llama", "--adapter-path", str(adapter),
               "--format", fmt.name, "--out", str(out), "--max-len", str(MAX_LEN)])
    assert rc == 0 and out.is_file()
    return fmt, out


@pytest.fixture(scope="module")
def merged(adapter):
    model, tok = merged_model("tiny-llama", str(adapter))
    return NextToken(model).eval(), tok


def _padded(ids):
    buf = torch.zeros(1, MAX_LEN, dtype=torch.long)
    buf[0, :len(ids)] = torch.tensor(ids)
    return buf, torch.tensor([len(ids)])


def test_program_logits_equal_torch(program, merged):
    fmt, path = program
    runner, meta = load_runner(fmt.engine, str(path))
    assert meta["max_len"] == MAX_LEN and meta["format"] == fmt.name
    wrapper, tok = merged
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, MAX_LEN):  # lengths: the padding after them must not matter
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        with torch.no_grad():
            ref = wrapper(*_padded(ids))
        got = runner(*_padded(ids))
        assert got.shape == ref.shape == (1, meta["vocab"])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_program_generates_what_the_adapter_learned(program, merged, capsys):
    fmt, path = program
    wrapper, tok = merged
    runner, _ = load_runner(fmt.engine, str(path))
    ids = tok(PROMPT)["input_ids"]
    got, _ = generate_ids(runner, ids, MAX_LEN, 7, tok.eos_token_id)
    ref, _ = generate_ids(lambda t, n: wrapper(t, n), ids, MAX_LEN, 7, tok.eos_token_id)
    assert got == ref  # greedy tokens equal torch's
    assert tok.decode(got).startswith(TARGET[:5])  # the adapter's completion ...
    base, _ = merged_model("tiny-llama")
    plain, _ = generate_ids(NextToken(base).eval(), ids, MAX_LEN, 7, tok.eos_token_id)
    assert not tok.decode(plain).startswith(TARGET[:5])  # ... which the base does not make
    # and through the CLI
    rc = main(["generate", "--engine", fmt.engine, "--program", str(path), "--prompt", PROMPT,
               "--max-tokens", "7"])
    assert rc == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(got, skip_special_tokens=True)


def test_tied_embedding_stored_once(program, merged):
    fmt, path = program
    wrapper, _ = merged
    emb = wrapper.model.get_input_embeddings().weight
    assert wrapper.model.get_output_embeddings().weight is emb
    params = sum(p.numel() * p.element_size() for p in wrapper.parameters())  # tied: once
    if fmt.name == "pte":  # a second copy of the table would not fit beside the rest
        assert path.stat().st_size < params + emb.numel() * emb.element_size()
    else:
        import onnx
        shapes = [list(i.dims) for i in onnx.load(str(path)).graph.initializer]
        assert sum(s in (list(emb.shape), list(emb.shape)[::-1]) for s in shapes) == 1


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    from types import SimpleNamespace
    monkeypatch.setitem(sys.modules, "executorch", None)  # import executorch -> ImportError
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    args = SimpleNamespace(model="tiny-llama", adapter_path="", dtype="float32", format="pte",
                           out=str(tmp_path / "m.pte"), max_len=8)
    with pytest.raises(SystemExit) as e:
        export(args)
    assert "pip install pocketllm[executorch]" in str(e.value) and "\n" not in str(e.value)


def test_wrong_program_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        load_runner("executorch", str(tmp_path / "missing.pte"))
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    (tmp_path / "m.onnx.json").write_text(json.dumps({"format": "onnx", "max_len": 8}))
    with pytest.raises(SystemExit, match="--engine onnxruntime"):
        load_runner("executorch", str(p))


def test_trained_in_executorch_exported_and_generated(tmp_path):
    """The whole path on a phone's engine: prge trains with --engine executorch, the adapter is
    exported as a .pte, and the program's next-token distribution is the trained model's (torch,
    adapter merged) and has moved the way training pushed it: the target's first token is more
    likely than under the base model."""
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    data = write_data(tmp_path / "data", [(PROMPT, TARGET)] * 4, valid=1)
    run = tmp_path / "run"
    rc = main(["train", "--model", "tiny-llama", "--data", str(data), "--method", "prge",
               "--engine", "executorch", "--program-cache", str(tmp_path / "cache"),
               "--iters", "40", "--learning-rate", "1e-1", "--batch-size", "2",
               "--steps-per-eval", "0", "--no-eval-before", "--save-every", "0",
               "--no-keep-best", "--threads", "1", "--adapter-path", str(run)])
    assert rc == 0
    out = tmp_path / "m.pte"
    assert main(["export", "--model", "tiny-llama", "--adapter-path", str(run), "--format",
                 "pte", "--out", str(out), "--max-len", str(MAX_LEN)]) == 0
    runner, _ = load_runner("executorch", str(out))
    model, tok = merged_model("tiny-llama", str(run))
    base, _ = merged_model("tiny-llama")
    ids = tok(PROMPT)["input_ids"]
    target = tok(TARGET)["input_ids"][0]
    got = runner(*_padded(ids))
    with torch.no_grad():
        ref = NextToken(model).eval()(*_padded(ids))
        plain = NextToken(base).eval()(*_padded(ids))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # (deterministic: seeded training; -5.11 against the base's -5.38 nats when written)
    assert (got.log_softmax(-1)[0, target] > plain.log_softmax(-1)[0, target] + 0.1), \
        (got.log_softmax(-1)[0, target].item(), plain.log_softmax(-1)[0, target].item())


def test_a_prompt_tuning_prefix_is_refused_in_one_line(tmp_path):
    """A set the exported program cannot hold (virtual tokens are inputs, not weights) is
    refused by its spec's `export_refused`, naming the flag."""
    from pocketllm.export import ExportError
    from pocketllm.models import load_model
    from pocketllm.prompt import PromptSpec, add_virtual_tokens
    model, _ = load_model("tiny-llama")
    add_virtual_tokens(model, 2)
    PromptSpec(num_virtual_tokens=2).save(model, tmp_path / "prefix", "tiny-llama")
    with pytest.raises(ExportError, match=r"--adapter-path .*prefix: a prompt-tuning prefix "
                       r"cannot be merged.*LoRA, norm and head") as e:
        merged_model("tiny-llama", str(tmp_path / "prefix"))
    assert "\n" not in str(e.value)

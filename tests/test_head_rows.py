"""`--trainable head` (pocketllm/head_rows.py): offsets to a few rows of the output head. The
streamed losses, the perturbed replicas and generation all see the same offset rows; the tied
input embedding does not move; the rows come from the data when not given; the saved offsets
load back, merge into an untied head, and train end to end under prge (the conformance tests
run it under every method that takes it)."""

import json

import pytest
import torch

from pocketllm.cli import main
from pocketllm.config import TrainArgs
from pocketllm.head_rows import (RowsHead, add_rows_head, parse_ids, rows_head,
                                 target_tokens)
from pocketllm.loss import PlainHead, backbone, output_head, stream_head
from pocketllm.models import load_model
from pocketllm.trainable import complete, setup_trainable
from pocketllm.zo.perturb import Perturber
from tests.helpers import TEXTS, score, tiny_batch, write_data

IDS = [3, 5, 200]  # rows in two chunks of the streamed head (its chunk shrunk to 64 rows)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr("pocketllm.loss.VOCAB_CHUNK", 64)


def _head_model(name="tiny-llama", ids=IDS, scale=0.3):
    model, tok = load_model(name)
    spec, params = setup_trainable(model, TrainArgs(model=name, trainable="head",
                                                    head_tokens=",".join(map(str, ids))))
    with torch.no_grad():
        params[0][1].copy_(torch.randn(params[0][1].shape,
                                       generator=torch.Generator().manual_seed(0)) * scale)
    return model, tok, spec, params


def test_the_set_is_the_offset_alone_and_the_embedding_stays_tied():
    model, _, spec, params = _head_model()
    (name, delta), = params
    assert name.endswith("delta") and delta.shape == (len(IDS), model.config.hidden_size)
    assert delta.requires_grad and not any(p.requires_grad for n, p in model.named_parameters()
                                           if p is not delta)
    assert spec.token_ids == IDS
    head = rows_head(model)
    # the tied table is still one tensor, read by the input embedding unchanged
    assert head.weight is model.get_input_embeddings().weight


def test_streamed_loss_logits_and_rows_agree_with_an_explicit_head():
    model, tok, _, params = _head_model()
    delta = params[0][1].detach()
    head = rows_head(model)
    full = head.base.weight.detach().clone()
    full[IDS] += delta
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        h = backbone(model, b)[0]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0]
        assert torch.allclose(logits, h @ full.T, atol=1e-5)
        tgt = b["input_ids"][0]
        p = stream_head(h, tgt, PlainHead(head).chunks(1))
        ref = torch.logsumexp(h @ full.T, dim=1)
        assert torch.allclose(p.lse, ref, atol=1e-5)
        ids = torch.tensor([5, 7, 200])
        (w,), _ = PlainHead(head).rows(ids, 1)
        assert torch.equal(w, full[ids])


def test_each_replica_sees_its_own_perturbed_offset_and_nothing_else_moves():
    """Under `Perturber.active` group g reads the head with rows IDS + delta + s_g eps z_g
    (chunked and by rows), every other row as stored; the base table is never written."""
    model, tok, _, params = _head_model()
    pert = Perturber(model, params, dist="rademacher")
    head = rows_head(model)
    table = head.base.weight.detach().clone()
    delta = params[0][1].detach().clone()
    eps, keys, signs = 0.1, [[11], [11], [12]], [1.0, -1.0, 1.0]
    with pert.active(keys, eps, signs, rows=3) as view:
        chunks = list(view.chunks(3))
        rows, _ = view.rows(torch.tensor(IDS), 3)
        for g in range(3):
            w = torch.cat([ws[g] for _, _, ws, _ in chunks])
            moved = (w != table).any(1).nonzero().flatten().tolist()
            assert moved == IDS
            off = w[IDS] - table[IDS] - delta
            z = off / (signs[g] * eps)
            assert torch.allclose(z.abs(), torch.ones_like(z), atol=1e-4)  # rademacher
            assert torch.allclose(rows[g], w[IDS])
        # a +/- pair shares its z; another key draws another one
        w0, w1, w2 = (torch.cat([ws[g] for _, _, ws, _ in chunks])[IDS] for g in range(3))
        assert torch.allclose(w0 - delta - table[IDS], -(w1 - delta - table[IDS]), atol=1e-6)
        assert not torch.allclose(w0, w2)
    assert torch.equal(head.base.weight, table) and torch.equal(params[0][1], delta)


def test_a_batched_pass_equals_the_replicas_one_by_one():
    """The losses of one forward over 3 groups (the backbone's hidden states from the feature
    cache: nothing below the head trains) equal each replica's alone, run whole."""
    from pocketllm.loss import group_losses
    from pocketllm.zo.feature_cache import FeatureCache
    model, tok, _, params = _head_model()
    pert = Perturber(model, params, dist="rademacher")
    b = tiny_batch(tok, TEXTS[:2], [" health", " work"])
    keys, signs = [[1], [1], [2]], [1.0, -1.0, 1.0]
    rep = {k: v.repeat(3, 1) for k, v in b.items()}
    with FeatureCache().serving(model, 3), pert.active(keys, 1e-2, signs, rows=6) as view:
        batched = group_losses(score(model, rep, 3, view), 3)
    alone = []
    for k, s in zip(keys, signs):
        with pert.active([k], 1e-2, [s], rows=2) as view:
            alone.append(group_losses(score(model, b, 1, view), 1)[0])
    assert torch.allclose(batched, torch.stack(alone), atol=1e-5)


def test_the_rows_come_from_the_data_when_not_given():
    model, tok = load_model("tiny-llama")
    b = [((1, 9, 9, 4, 2), 3), ((1, 8, 6, 2), 2)]
    assert target_tokens(b) == [2, 4, 6]
    assert target_tokens([((1, 2, 3), 2, {"label_ids": [7, 5]})]) == [5, 7]
    args = TrainArgs(model="tiny-llama", trainable="head")
    complete(args, b)
    assert args.head_tokens == "2,4,6"
    given = TrainArgs(model="tiny-llama", trainable="head", head_tokens="9")
    complete(given, b)
    assert given.head_tokens == "9"
    lora = TrainArgs(model="tiny-llama", trainable="lora")
    complete(lora, b)
    assert lora.head_tokens == ""


@pytest.mark.parametrize("text,match", [("", "no rows to train"), ("3,x", "'x' is not a token"),
                                        ("999", "outside the vocabulary")])
def test_bad_rows_are_one_line_errors(text, match):
    model, _ = load_model("tiny-llama")
    with pytest.raises(SystemExit, match=match):
        setup_trainable(model, TrainArgs(model="tiny-llama", trainable="head",
                                         head_tokens=text))
    assert parse_ids(" 7, 3,7") == [3, 7]


def test_merge_unties_the_head_and_keeps_the_outputs(tmp_path):
    from pocketllm.trainable import load_saved
    model, tok, spec, _ = _head_model()
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    spec.save(model, tmp_path, base_model="tiny-llama")
    fresh, _ = load_model("tiny-llama")
    emb = fresh.get_input_embeddings().weight.detach().clone()
    load_saved(fresh, tmp_path)
    assert isinstance(output_head(fresh), RowsHead)
    assert spec.merge(fresh) == len(IDS)
    assert not isinstance(output_head(fresh), RowsHead)
    assert output_head(fresh).weight is not fresh.get_input_embeddings().weight
    assert torch.equal(fresh.get_input_embeddings().weight, emb)  # the input is untouched
    with torch.no_grad():
        got = fresh(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError, match="already has trained rows"):
        add_rows_head(load_saved(model, tmp_path) and model, IDS)


def test_prge_trains_the_answer_rows_end_to_end(tmp_path, capsys):
    """prge with --trainable head on records: the rows are the completions' tokens (and EOS),
    the valid loss falls, the ZO log replays to the same offsets bit for bit, and eval and
    generate load the saved rows."""
    from safetensors.torch import load_file
    from pocketllm.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    recs = [("Ran 5 km this morning.", " health"), ("Paid the rent.", " money"),
            ("Sam picks the kids up.", " family"), ("Permit is due.", " work")] * 2
    data = write_data(tmp_path / "data", [(f"Note: {t}\nCategory:", c) for t, c in recs], 4)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", str(data), "--method", "prge",
                 "--trainable", "head", "--iters", "30", "--batch-size", "4",
                 "--learning-rate", "5e-2", "--steps-per-eval", "0", "--threads", "1",
                 "--adapter-path", str(out)]) == 0
    text = capsys.readouterr().out
    model, tok = load_model("tiny-llama")
    want = sorted({t for _, c in recs for t in tok(c, add_special_tokens=False).input_ids}
                  | {tok.eos_token_id})
    assert json.loads((out / ADAPTER_CONFIG).read_text())["token_ids"] == want
    import re
    found = re.search(r"held-out loss\s+([\d.]+) -> ([\d.]+)", text)
    before, after = (float(x) for x in found.groups())
    assert after < before - 0.05
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a, r = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (out, rebuilt))
    assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a)
    assert main(["eval", "--model", "tiny-llama", "--data", str(data), "--split", "valid",
                 "--adapter-path", str(out)]) == 0
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Note:", "--max-tokens", "3",
                 "--adapter-path", str(out)]) == 0


@pytest.mark.parametrize("fmt,engine", [("onnx", "onnxruntime"), ("pte", "executorch")])
def test_export_keeps_one_table_and_the_rows_logits(tmp_path, fmt, engine):
    """`export` of a head adapter: the program's logits are the model's with its offset rows,
    and the tied table is stored once (the offset rides beside it)."""
    pytest.importorskip(engine, reason=f"the {fmt} extra is not installed")
    from pocketllm.export import NextToken, load_runner, merged_model
    model, tok, spec, _ = _head_model()
    spec.save(model, tmp_path / "rows", base_model="tiny-llama")
    out = tmp_path / f"m.{fmt}"
    assert main(["export", "--model", "tiny-llama", "--adapter-path", str(tmp_path / "rows"),
                 "--format", fmt, "--out", str(out), "--max-len", "16"]) == 0
    runner, meta = load_runner(engine, str(out))
    wrapper = NextToken(merged_model("tiny-llama", str(tmp_path / "rows"))[0]).eval()
    ids = tok("Note: tea")["input_ids"]
    buf = torch.zeros(1, 16, dtype=torch.long)
    buf[0, :len(ids)] = torch.tensor(ids)
    n = torch.tensor([len(ids)])
    with torch.no_grad():
        ref = wrapper(buf, n)
        direct = model(input_ids=buf[:, :len(ids)]).logits[:, -1]
    torch.testing.assert_close(ref, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner(buf, n), ref, rtol=1e-4, atol=1e-4)
    emb = model.get_input_embeddings().weight
    if fmt == "onnx":
        import onnx
        shapes = [list(i.dims) for i in onnx.load(str(out)).graph.initializer]
        assert sum(s in (list(emb.shape), list(emb.shape)[::-1]) for s in shapes) == 1
    else:  # a second copy of the table would not fit beside the rest
        params = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        assert out.stat().st_size < params + emb.numel() * emb.element_size()

"""A quantized frozen base (--quantize-base): close to the float forward, a ZO-LoRA step on it
lowers the loss, resume equals an uninterrupted run with it on, and refusals where it makes no
sense."""

from __future__ import annotations

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.loss import group_losses
from pocketllm.methods import build, get_method
from pocketllm.models import load_model
from pocketllm.quantize import SCHEMES, Int4Linear, base_linears, quantized_layers
from tests.helpers import TEXTS, score, tiny_batch, write_data
from tests.methods.test_conformance import (_same, _saved, _step_losses, _train,  # noqa: F401
                                            split_server)

QUANTIZED = [s for s in SCHEMES if s != "none"]
# relative error of the logits against the float model's, tiny-llama (hidden 64): int8 per
# channel is ~0.7%; 4 bits per group of 64 on its uniform random weights ~10%
TOLERANCE = {"int8": 0.03, "int8-dynamic": 0.03, "int4": 0.2}


@pytest.fixture(scope="module")
def float_model():
    return load_model("tiny-llama")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_quantized_forward_is_close_to_float(scheme, float_model):
    model, _ = load_model("tiny-llama", quantize=scheme)
    # every Linear but the (tied) head: 2 layers x (q, k, v, o, gate, up, down), then the
    # embedding and the head over its int8 table, stored once
    assert quantized_layers(model) == 14 + 2
    assert model.get_output_embeddings().table is model.get_input_embeddings().table
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(float_model[0], ids)
    got = _logits(model, ids)
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < TOLERANCE[scheme], err


def test_int4_kernel_multiplies_by_its_dequantized_weight():
    """Int4Linear is x @ W_q^T for the 4-bit W_q it stores (the kernel, not an approximation
    of it), and W_q is within a 4-bit step of the float weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    q = Int4Linear(lin, 128)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 96 * 256 // 2  # 2 per byte
    w = q.dequantized()
    step = (lin.weight.reshape(96, 2, 128).amax(-1) - lin.weight.reshape(96, 2, 128).amin(-1)) / 15
    assert ((w - lin.weight).abs().reshape(96, 2, 128) <= step[..., None] * 0.51 + 1e-2).all()
    x = torch.randn(3, 5, 256)
    ref = x.to(torch.bfloat16).float() @ w.T + lin.bias
    torch.testing.assert_close(q(x), ref, rtol=2e-2, atol=2e-2)


def test_random_model_quantized_as_it_loads():
    """random: shapes quantize each layer as it is filled: what a real layer-by-layer load
    holds (the memory benchmark's OPT-1.3B); the head stays the tied embedding."""
    model, _ = load_model("random:smollm2-135m", quantize="int4")
    assert quantized_layers(model) == 30 * 7 + 2  # and the embedding, the head over it
    assert not base_linears(model)  # no float Linear left
    assert model.get_output_embeddings().table is model.get_input_embeddings().table


def _args(**kw):
    return TrainArgs(model="tiny-llama", trainable="lora", lora_rank=4, learning_rate=2e-2,
                     **kw)


@pytest.mark.parametrize("name,settings,steps", [("zo-sgd", {"eps": 1e-2}, 60),
                                                 ("prge", {"queries": 4}, 30)])
def test_zo_lora_on_a_quantized_base_lowers_the_loss(name, settings, steps):
    model, tok = load_model("tiny-llama", quantize="int4")
    batch = tiny_batch(tok, TEXTS)
    args = _args(method=name, quantize_base="int4")
    cls = get_method(name)
    _, params = cls.trainable(model, args)
    assert all(p.dtype == torch.float32 for _, p in params)  # the adapter stays float

    def loss():
        with torch.no_grad():
            return float(group_losses(score(model, batch), 1))
    method = build(name, model, params, args, None, **settings)
    before = loss()
    for i in range(steps):
        method.step([batch], i, args.learning_rate)
    method.sync()
    assert loss() < before - 0.05


def test_split_device_backbone_quantized(split_server, tmp_path):
    """Split mode: the device's frozen backbone in 4 bits streams its taps; the server's side
    network still learns (the loss of a fixed batch falls)."""
    pytest.importorskip("grpc")
    address, token = split_server
    model, tok = load_model("tiny-llama", quantize="int4")
    args = TrainArgs(model="tiny-llama", method="side", trainable="full", seed=3,
                     learning_rate=1e-2, quantize_base="int4")
    cls = get_method("side")
    cls.check(args)  # split mode takes a quantized backbone
    _, params = cls.trainable(model, args)
    m = build("side", model, params, args, side_width=16, server=address,
              token_file=str(token))
    b = tiny_batch(tok, TEXTS)

    def loss():
        with m.evaluating(), torch.no_grad():
            return float(group_losses(score(model, b), 1))
    try:
        before = loss()
        m.open_log(tmp_path, fresh=True)
        for _ in m.steps(lambda s: [b], 0, 20, lambda s: (args.learning_rate, None)):
            pass
        after = loss()
    finally:
        m.close()
    assert quantized_layers(model) == 14 + 2 and after < before - 0.05


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("qdata"),
                      [(f"Note: {t}\nCategory:", c)
                       for t, c in zip(TEXTS, [" errand", " health", " health", " money"])])


def test_resume_equals_uninterrupted_on_a_quantized_base(tmp_path, data_dir, capsys):
    extra = ["--quantize-base", "int8", "--zo-optimizer", "momentum"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _train(ref, data_dir, "zo-sgd", "lora", 6, extra)
    _train(cut, data_dir, "zo-sgd", "lora", 3, extra)
    _train(cut, data_dir, "zo-sgd", "lora", 6, [*extra, "--resume"])
    assert _step_losses(cut) == _step_losses(ref)
    a, b = _saved(ref), _saved(cut)
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    # the losses are the quantized model's, not the float one's
    flt = tmp_path / "float"
    _train(flt, data_dir, "zo-sgd", "lora", 1, ["--zo-optimizer", "momentum"])
    assert _step_losses(flt)[0] != _step_losses(ref)[0]


@pytest.mark.parametrize("argv,says", [
    (["--method", "lora-adam", "--trainable", "lora"], "backpropagates through the base"),
    (["--method", "zo-sgd", "--trainable", "full"], "--trainable full"),
    # an engine builds the schemes of its `schemes` into its programs and refuses the others
    (["--method", "zo-sgd", "--engine", "executorch", "--quantize-base", "int8"],
     "--engine executorch builds int8-dynamic into its programs, not --quantize-base int8"),
    (["--method", "prge", "--engine", "executorch"], "--engine executorch builds int8-dynamic "
                                                     "into its programs, not --quantize-base "
                                                     "int4"),
])
def test_refused_where_it_makes_no_sense(argv, says, tmp_path, data_dir, capsys):
    from pocketllm.cli import main
    with pytest.raises(SystemExit) as e:  # (argv's own --quantize-base, last, wins)
        main(["train", "--model", "tiny-llama", "--data", str(data_dir), "--quantize-base",
              "int4", *argv, "--adapter-path", str(tmp_path / "out")])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_zeroth_order_run_is_warned_off_a_base_that_rounds_its_activations(tmp_path,
                                                                           capsys):
    """torch's int8-dynamic rounds every layer's activations, the perturbed ones too: the run
    goes on, with one warning naming the schemes that keep the estimate. A weight-only scheme,
    or an engine that builds int8-dynamic into its programs (rounding below the adapter only),
    gets none."""
    from pocketllm.cli import main
    from tests.test_cli import FAST
    for scheme, warned in (("int8-dynamic", True), ("int8", False)):
        assert main(["train", *FAST, "--iters", "1", "--method", "zo-sgd", "--steps-per-eval",
                     "0", "--quantize-base", scheme, "--adapter-path",
                     str(tmp_path / scheme)]) == 0
        err = capsys.readouterr().err
        assert ("rounds the activations of every layer" in err) == warned
        assert ("Use int8 or int4" in err) == warned


def test_memory_estimate_counts_the_quantized_base():
    from pocketllm.memory_estimate import estimate
    from pocketllm.models import load_config
    cfg = load_config("random:opt-1.3b")
    zo = get_method("zo-sgd")
    flt = estimate(cfg, zo, "lora", 1, 64, framework=300.0)
    q4 = estimate(cfg, zo, "lora", 1, 64, framework=300.0, quantize="int4")
    q8 = estimate(cfg, zo, "lora", 1, 64, framework=300.0, quantize="int8")
    # OPT-1.3B: 1.21e9 Linear weights besides the tied head (4608 MiB in float32): 4 bytes
    # -> 1 (+ a scale per row) -> 0.5 (+ a bfloat16 scale and zero per 128)
    # and the tied 50272 x 2048 table in int8 rows: 4 bytes -> 1 + a float32 scale per row
    table = 50272 * 2048 * 4 / 2**20 - 50272 * (2048 + 4) / 2**20
    assert 3440 < flt.total - q8.total - table < 3460
    assert 530 < q8.total - q4.total < 545
    assert "base Linear weights (int4)" in q4.components
    assert q4.components["embedding table (int8 rows)"] == pytest.approx(50272 * 2052 / 2**20)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_directory_streamed_equals_loaded_then_quantized(scheme, tmp_path):
    """A model directory quantizes layer by layer as it is read (`models/stream.py`): the same
    weights as loading it whole and quantizing after; a checkpoint it cannot read that way
    (a name missing) is loaded whole."""
    from pocketllm.models import resolve, source_of
    from pocketllm.models.base import Source
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    streamed, _ = load_model(str(tmp_path / "m"), quantize=scheme)
    src = resolve(str(tmp_path / "m"))
    whole, _ = Source.load_quantized(source_of(src.kind), src, torch.float32, scheme)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert quantized_layers(streamed) == 14 + 2
    for a, b in [(streamed.lm_head.table, whole.lm_head.table),
                 (streamed.model.layers[1].mlp.down_proj, whole.model.layers[1].mlp.down_proj)]:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x.dequantize() if hasattr(x, "dequantize") else x,
                               y.dequantize() if hasattr(y, "dequantize") else y), name
    torch.testing.assert_close(_logits(streamed, ids), _logits(whole, ids), rtol=0, atol=0)
    # a name the model has and the file lacks: loaded whole, quantized after
    from safetensors.torch import load_file, save_file
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd["renamed"] = sd.pop("model.norm.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    fallback, _ = load_model(str(tmp_path / "m"), quantize=scheme)
    assert quantized_layers(fallback) == 14 + 2


def test_int8_table_losses_equal_the_dequantized_float_model(float_model, monkeypatch):
    """The embedding table and the tied head in int8 rows (`Int8Rows`): the streamed LM loss
    (read a chunk at a time), the label-word rows and the full logits equal those of the float
    model whose table is the dequantized int8 one; each row within half a step of the float."""
    import copy

    from pocketllm import loss
    from pocketllm import quantize as Q
    monkeypatch.setattr(loss, "VOCAB_CHUNK", 64)  # several chunks of the 260-row table
    monkeypatch.setattr(Q, "TABLE_CHUNK", 100)
    f, tok = float_model
    q = copy.deepcopy(f)
    assert Q.quantize_tables(q) == 1  # one table: the head is tied to it
    table = q.get_input_embeddings().table
    assert table.q.dtype == torch.int8 and q.get_output_embeddings().table is table
    w = f.get_input_embeddings().weight.detach()
    assert ((table.dequantized() - w).abs() <= table.scale / 2 + 1e-7).all()
    ref = copy.deepcopy(f)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(table.dequantized())  # (tied: the head too)
    b = tiny_batch(tok, TEXTS)
    got = score(q, b).nll
    torch.testing.assert_close(got, score(ref, b).nll, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, score(f, b).nll, rtol=1e-7, atol=0)  # int8 rows, not float
    ids = torch.tensor([3, 70, 259, 3])
    (wq,), _ = loss.PlainHead(q.get_output_embeddings()).rows(ids, 1)
    (wr,), _ = loss.PlainHead(ref.get_output_embeddings()).rows(ids, 1)
    torch.testing.assert_close(wq, wr, rtol=0, atol=1e-7)
    torch.testing.assert_close(_logits(q, b["input_ids"]), _logits(ref, b["input_ids"]),
                               rtol=1e-5, atol=1e-5)

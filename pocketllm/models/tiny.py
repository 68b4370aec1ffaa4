"""Tiny random models (`tiny-llama`, `tiny-gpt2`, `tiny-opt`, `tiny-gemma`, the masked LM
`tiny-roberta`): deterministic weights and the byte-level `tiny_tokenizer()`, built offline in well
under a second (tests, quick tries)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import MASKED_LM_TYPES, ModelSource, Source, auto_class

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Architecture kwargs of the tiny models; vocab size and special token ids come from
# `tiny_tokenizer()` when the config is built. Max positions are 512 for all of them.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # like the default smollm2-135m
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=512),
    "tiny-opt": dict(
        model_type="opt",
        num_hidden_layers=2,
        hidden_size=64,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
    ),
    "tiny-gemma": dict(
        model_type="gemma3_text",  # Gemma3ForCausalLM; falls back to gemma2/gemma on old transformers
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # RobertaForMaskedLM; its tokenizer has a <mask> token. RoBERTa numbers positions from
    # pad_token_id + 1, so its table is 512 + pad + 1 rows (set in _tiny_config).
    "tiny-roberta": dict(
        model_type="roberta",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        type_vocab_size=1,
    ),
}

# Seed of the tiny models' weights (and of the random models' pool of values).
SEED = 0

# Byte-level tokenizer of the tiny models: 256 byte tokens, then these specials (ids 256..259).
_TINY_PAD, _TINY_BOS, _TINY_IM_START, _TINY_IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_TINY_SPECIALS = (_TINY_PAD, _TINY_BOS, _TINY_IM_START, _TINY_IM_END)
_TINY_MASK = "<mask>"  # id 260, only in the masked LMs' tokenizer
# ChatML, like the default model's template but without its built-in system prompt.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer(mask: bool = False) -> "PreTrainedTokenizerFast":
    """A byte-level tokenizer with 260 tokens, built offline in milliseconds.

    Ids 0..255 are the bytes (so any text round-trips exactly), then ``<|pad|>`` (pad),
    ``<|endoftext|>`` (bos), ``<|im_start|>`` and ``<|im_end|>`` (eos, as in the default model, so
    a chat turn and generation end on the same token). No BOS is added automatically (also like the
    default model). Has a ChatML chat template. `mask`: also ``<mask>`` (id 260, the mask token),
    for masked LMs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spelling = _bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    specials = _TINY_SPECIALS + ((_TINY_MASK,) if mask else ())
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_TINY_BOS,
        eos_token=_TINY_IM_END,
        pad_token=_TINY_PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        **({"mask_token": _TINY_MASK} if mask else {}),
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    tokenizer.name_or_path = "tiny-tokenizer"
    return tokenizer


def _tiny_config(name: str, tokenizer) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(TINY_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    if model_type == "gemma3_text" and model_type not in CONFIG_MAPPING:  # transformers < 4.50
        model_type = "gemma2" if "gemma2" in CONFIG_MAPPING else "gemma"
        kwargs.pop("layer_types", None)
    if model_type == "roberta":  # positions count from pad + 1: 512 usable positions
        kwargs["max_position_embeddings"] = 512 + tokenizer.pad_token_id + 1
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _build_tiny(name: str, dtype: torch.dtype, tokenizer) -> "PreTrainedModel":
    config = _tiny_config(name, tokenizer)
    # Seeded inside fork_rng: the same weights on every call, and the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = auto_class(config).from_config(config)  # initialised in fp32 ...
    model = model.to(dtype)  # ... so bfloat16 weights are the rounded float32 ones
    model.config.name_or_path = name
    return model


def byte_tokenizer(model_type: str) -> "PreTrainedTokenizerFast":
    """`tiny_tokenizer()`, with <mask> for a masked-LM architecture (tiny and random models)."""
    return tiny_tokenizer(mask=model_type in MASKED_LM_TYPES)


class OfflineSource(Source):
    """A kind whose names are the keys of `configs` (architecture kwargs): built offline, with
    the byte-level tokenizer (and <mask> for masked LMs)."""

    configs: dict[str, dict[str, Any]] = {}
    what = "?"  # how the unknown-name error calls one of them

    def names(self) -> list[str]:
        return list(self.configs)

    def expected(self) -> str:
        return f"{self.what} ({', '.join(self.configs)})"

    def match(self, name: str) -> ModelSource | None:
        return ModelSource(kind=self.kind, name=name) if name in self.configs else None

    def tokenizer(self, src: ModelSource):
        return byte_tokenizer(self.configs[src.name]["model_type"])


class TinySource(OfflineSource):
    kind = "tiny"
    configs = TINY_CONFIGS
    what = "a tiny model"

    def describe(self, src: ModelSource) -> str:
        return f"{src.name!r} (tiny random model)"

    def load(self, src: ModelSource, dtype: torch.dtype):
        tokenizer = self.tokenizer(src)
        return _build_tiny(src.name, dtype, tokenizer), tokenizer

    def config(self, src: ModelSource, name: str) -> Any:
        return _tiny_config(src.name, self.tokenizer(src))

"""A real architecture's shape with random weights (`random:opt-1.3b`, `random:roberta-large`,
`random:smollm2-135m`): the published config, offline, for memory and speed measurements only
(the weights are NOT pretrained and the tokenizer is the tiny models' byte-level one)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import ModelSource
from .tiny import SEED, OfflineSource

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

# Real architectures' published configs, built with random weights (no hub, no download): what
# a memory estimate or measurement of those models needs. Never mistake them for the pretrained
# models, hence the "random:" prefix.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "random:opt-1.3b": dict(  # facebook/opt-1.3b
        model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048,
        do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        tie_word_embeddings=True),
    "random:roberta-large": dict(  # FacebookAI/roberta-large, RobertaForMaskedLM
        model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
        tie_word_embeddings=True),
    "random:smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M(-Instruct), the default model
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def _random_config(name: str) -> Any:
    from transformers import AutoConfig

    kwargs = dict(RANDOM_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


# Values the random models' weights are tiled from: uniform with std 0.02 (the configs'
# initializer_range). A prime length so that rows of a weight do not repeat in step.
_POOL_SIZE = 1_000_003


def _build_random(name: str, dtype: torch.dtype, quantize: str = "none") -> "PreTrainedModel":
    """A real architecture with random weights, fast and with no memory beyond the weights.

    HF's initialisation of 1.3B parameters takes minutes on a small CPU, so it is skipped
    (`stream.empty_model`, modules allocated directly in `dtype`) and every weight is filled by
    copying from one seeded block of random values (a memcpy per tensor, ~1 s for 1.3B)
    instead of drawing each value. Norm weights are 1 and biases 0, as after HF's init.
    `quantize` (a `pocketllm.quantize` scheme): each base Linear is quantized as soon as it is
    filled and its float weight freed (`stream.fill_streamed`), so the peak is the quantized
    model's plus one layer, as a real load that quantizes layer by layer would be.
    """
    from .stream import empty_model, fill_streamed

    model = empty_model(_random_config(name), dtype)
    g = torch.Generator().manual_seed(SEED)
    pool = (torch.rand(_POOL_SIZE, generator=g) * 2 - 1).mul_(0.02 * 3 ** 0.5).to(dtype)

    def fill(_name: str, p: torch.Tensor, mod) -> None:
        if "Norm" in type(mod).__name__ and _name.endswith("weight"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            _tile_(p.view(-1), pool)

    # a table's rows r0:r0 + len(t), the values a whole fill would give them (streamed loads
    # quantize the embedding a chunk of rows at a time)
    fill.rows = lambda _name, t, r0: _tile_(t.view(-1), pool, r0 * t.shape[1])

    threads = torch.get_num_threads()
    # one thread: the copies are memory-bound, and on a shared CPU torch's threads spin on
    # each other (measured 18 s with 2 threads against 6 s with 1 for random:opt-1.3b)
    torch.set_num_threads(1)
    try:
        fill_streamed(model, fill, quantize)
    finally:
        torch.set_num_threads(threads)
    model.config.name_or_path = name
    return model


def _tile_(flat: torch.Tensor, pool: torch.Tensor, start: int = 0) -> None:
    """Fill `flat` with `pool` repeated, from pool[start % len(pool)] on (writing every page,
    so the weights are resident): flat[i] = pool[(start + i) % len(pool)]."""
    n, i, j = pool.numel(), 0, start % pool.numel()
    while i < flat.numel():
        m = min(n - j, flat.numel() - i)
        flat[i:i + m].copy_(pool[j:j + m])
        i, j = i + m, 0


class RandomSource(OfflineSource):
    kind = "random"
    configs = RANDOM_CONFIGS
    what = "a random-weight shape"

    def describe(self, src: ModelSource) -> str:
        return f"{src.name!r} (random weights in a real model's shape; not pretrained)"

    def load(self, src: ModelSource, dtype: torch.dtype):
        return _build_random(src.name, dtype), self.tokenizer(src)

    def load_quantized(self, src: ModelSource, dtype: torch.dtype, scheme: str):
        return _build_random(src.name, dtype, scheme), self.tokenizer(src)

    def config(self, src: ModelSource, name: str) -> Any:
        return _random_config(src.name)

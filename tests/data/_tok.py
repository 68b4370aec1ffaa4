"""A tiny offline tokenizer for the data tests: byte-level BPE, one token per byte
(plus optional merges), special tokens, and a ChatML chat template."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable character table (what ByteLevel pre-tokenization emits).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_CHAR = _bytes_to_unicode()


def byte_id(b: int) -> int:
    """Token id of a single byte (ids 0..255 are the bytes, in byte order)."""
    return b


def tiny_tokenizer(
    bos: bool = False, eos: str | None = "</s>", merges: tuple[tuple[str, str], ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte tokens get ids 0..255 (= the byte value); specials follow from 256
    (``<pad>``=256, ``<s>``=257, ``</s>``=258, ``<|im_start|>``=259, ``<|im_end|>``=260);
    each merge adds one token after that. ``bos=True`` makes the tokenizer prepend
    ``<s>`` by itself (like Llama's); ``eos`` names the EOS token (``"<|im_end|>"``
    as in ChatML models, or None for none)."""
    return _build(bos, eos, tuple(merges))


@lru_cache(maxsize=None)
def _build(bos: bool, eos: str | None, merges: tuple[tuple[str, str], ...]) -> PreTrainedTokenizerFast:
    vocab = {BYTE_CHAR[b]: b for b in range(256)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    bpe_merges = []
    for a, b in merges:
        a_, b_ = ("".join(BYTE_CHAR[x] for x in t.encode()) for t in (a, b))
        bpe_merges.append((a_, b_))
        vocab[a_ + b_] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def ids_of(text: str) -> list[int]:
    """The byte ids of ``text`` under a merge-free tiny tokenizer."""
    return list(text.encode())

"""Will it fit? Peak RSS of a run estimated from the model's config alone.

    estimate(config, method, trainable, batch, seq, dtype) -> Estimate (a list of components)

The model is built on the meta device (shapes, no memory) to count its parameters exactly;
everything else is arithmetic on the config:

* weights: every parameter and buffer once (tied ones once), plus LoRA A/B (float32);
* activations: what one forward keeps alive.
  - inference (no autograd) keeps about one layer's working set at a time (`_layer_working_set`)
    plus the loss's scratch: the output head is streamed in `loss.VOCAB_CHUNK`-row chunks, so
    only a (scored positions x 2048) block of logits exists at once;
  - autograd (lora-adam, adam) keeps every layer's saved tensors for the backward pass. The bytes
    per token per layer come from `SAVED_PER_LAYER`, measured by tracing the saved tensors of
    each architecture family with `saved_activation_bytes` (tests/test_memory_estimate.py
    re-derives them), plus the chunked loss's saved tensors (its float32 exp() per chunk:
    4 bytes per scored position per vocabulary row, and one copy of the scored hidden states per
    chunk), plus one layer's working set for the backward's own temporaries;
  - zo-sgd keeps what inference keeps (of the batch, or of the batch twice for --zo-passes pair)
    plus the Perturber's scratch (`pocketllm.zo.perturb`): one buffer per sign for the largest
    trainable weight (the copies are built just in time, per module, into reused buffers), one
    per sign for a head chunk, and a perturbed embedding lookup;
* gradients: one per trainable weight, in its dtype (adam: the whole model; lora-adam: A, B);
* optimizer state: AdamW's two moments per trainable weight, plus its per-tensor temporary;
* framework: the Python + torch + transformers process before any weights (measured in this
  process when it has imported them, else `FRAMEWORK_MB`).

First-order peak: the backward starts with every activation saved and frees them layer by layer
while the gradients fill in, so the peak is weights + optimizer state + the larger of (saved
activations + the head's gradient, which comes first) and (all gradients + the AdamW
temporary). Scored positions: a causal LM's workload scores every position (the dense case,
`pocketllm.workload`); a masked LM scores one <mask> per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MB = 2**20
# python + torch + transformers + tokenizers, resident, before a model is loaded (measured on
# this machine: 330-345 MB); used only when the estimate runs without them imported
FRAMEWORK_MB = 340.0
# glibc arenas, OpenMP/oneDNN thread pools and allocator slack a run adds on top (measured on
# tiny models: 12-20 MB)
RUNTIME_SLACK_MB = 20.0

# glibc's heap under autograd: the temporaries freed between kept activations leave holes the
# heap cannot return, so RSS exceeds the live bytes. Measured: RSS / live = 1.30-1.33 for
# lora-adam and adam on smollm2-135m (bfloat16, 16 x 128), 1.42 traced on the same forward.
AUTOGRAD_HEAP_OVERHEAD = 0.30

# Bytes saved for backward per token per layer: c_h * hidden + c_f * ffn + c_a * heads, by
# (family, trainable, dtype). Derived by `saved_activation_bytes` (least squares over tiny
# configs of each family, 2 vs 3 layers; exact to a few bytes); re-derived in the tests.
SAVED_PER_LAYER: dict[tuple[str, str, str], tuple[float, float, float]] = {
    ("gated", "full", "float32"): (40.0, 16.0, 4.0),
    ("gated", "full", "bfloat16"): (24.0, 8.0, 4.0),
    ("gated", "lora", "float32"): (28.5, 12.0, 0.0),
    ("gated", "lora", "bfloat16"): (24.5, 6.0, 0.0),
    ("relu", "full", "float32"): (32.0, 4.0, 4.0),
    ("relu", "full", "bfloat16"): (16.0, 2.0, 4.0),
    ("relu", "lora", "float32"): (28.5, 4.0, 0.0),
    ("relu", "lora", "bfloat16"): (20.5, 2.0, 0.0),
    ("encoder", "full", "float32"): (32.0, 8.0, 4.0),
    ("encoder", "full", "bfloat16"): (16.0, 4.0, 4.0),
    ("encoder", "lora", "float32"): (28.5, 4.0, 0.0),
    ("encoder", "lora", "bfloat16"): (20.5, 2.0, 0.0),
}
# architecture family by model_type: gated MLP (3 ffn matrices), ReLU/GELU MLP, encoder (MLM)
FAMILY = {"llama": "gated", "mistral": "gated", "qwen2": "gated", "qwen3": "gated",
          "gemma": "gated", "gemma2": "gated", "gemma3_text": "gated", "phi3": "gated",
          "opt": "relu", "gpt2": "relu", "roberta": "encoder", "bert": "encoder",
          "xlm-roberta": "encoder"}
METHODS = ("inference", "zo-sgd", "lora-adam", "adam")


@dataclass
class Shape:
    """What the estimate needs from a config."""

    family: str
    masked: bool
    layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    params: int          # distinct parameters (tied once)
    param_bytes: int     # their bytes in the run's dtype, plus buffers
    largest: int         # elements of the largest parameter
    largest_linear: int  # elements of the largest Linear weight besides the output head
    lora_params: int     # LoRA A+B elements for the given rank / targets
    lora_largest: int


@dataclass
class Estimate:
    """The breakdown, in MiB; `total` is the estimated peak RSS."""

    method: str
    trainable: str
    components: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    def table(self, measured: float | None = None) -> str:
        w = max(len(k) for k in self.components) + 2
        lines = [f"{'component':{w}s}{'MB':>10s}"]
        lines += [f"{k:{w}s}{v:10.0f}" for k, v in self.components.items()]
        lines.append(f"{'estimated peak RSS':{w}s}{self.total:10.0f}")
        if measured is not None:
            err = (self.total - measured) / measured
            lines.append(f"{'measured peak RSS':{w}s}{measured:10.0f}   (estimate {err:+.1%})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _meta_model(config):
    from .models import auto_class
    with torch.device("meta"):
        return auto_class(config).from_config(config)


class UnknownShape(ValueError):
    """A config the estimator cannot build or read (an architecture transformers does not know
    from its config alone, or one without the usual size fields)."""


def model_shape(config, dtype: str = "float32", lora_rank: int = 8,
                lora_targets: list[str] | None = None) -> Shape:
    """Parameter counts from a meta-device build of `config`; layer sizes from its fields.
    Raises UnknownShape where the config cannot be read that way."""
    try:
        return _model_shape(config, dtype, lora_rank, lora_targets)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UnknownShape(f"cannot estimate model_type "
                           f"{getattr(config, 'model_type', '?')!r}: {e}") from e


def _model_shape(config, dtype: str, lora_rank: int, lora_targets: list[str] | None) -> Shape:
    from .lora import _matches, default_targets
    from .models import MASKED_LM_TYPES

    model = _meta_model(config)
    bpe = torch.finfo(getattr(torch, dtype)).bits // 8
    params = list(model.parameters())  # distinct: tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    targets = list(lora_targets or default_targets(model))
    lora, lora_largest, largest_linear = 0, 0, 0
    head = model.get_output_embeddings()
    layers = _get(config, "num_hidden_layers", "n_layer")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            largest_linear = max(largest_linear, mod.weight.numel())
        if isinstance(mod, torch.nn.Linear) and _matches(name, targets):
            n = lora_rank * (mod.in_features + mod.out_features)
            lora += n
            lora_largest = max(lora_largest, lora_rank * max(mod.in_features, mod.out_features))
    mt = config.model_type
    return Shape(
        family=FAMILY.get(mt, "gated"), masked=mt in MASKED_LM_TYPES, layers=layers,
        hidden=_get(config, "hidden_size", "n_embd"),
        ffn=_get(config, "intermediate_size", "ffn_dim", "n_inner", default=None)
        or 4 * _get(config, "hidden_size", "n_embd"),
        heads=_get(config, "num_attention_heads", "n_head"), vocab=config.vocab_size,
        params=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() for p in params) * bpe + buffers,
        largest=max(p.numel() for p in params), largest_linear=largest_linear,
        lora_params=lora, lora_largest=lora_largest)


def _get(config, *names, default=0):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


_framework: float | None = None


def framework_mb(measure: bool = True) -> float:
    """RSS of a run's process before its weights: python, torch, transformers, pocketllm, a
    tokenizer, thread pools. Measured once per process by loading the tiny model in a fresh
    process (its weights are 0.1 MB) and running a step; `FRAMEWORK_MB` if that fails or
    `measure` is False."""
    global _framework
    if not measure:
        return FRAMEWORK_MB
    if _framework is not None:
        return _framework
    import json
    import platform

    import transformers

    from .models import cache_root
    # cached per interpreter / torch / transformers version: the probe takes seconds (minutes
    # on a busy CPU), the figure does not change between calls
    key = f"{platform.python_version()}|{torch.__version__}|{transformers.__version__}"
    path = cache_root() / "framework_rss.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            _framework = float(cached["rss_mb"])
            return _framework
    except (OSError, ValueError, KeyError):
        pass
    from .memory import run_in_fresh_process
    try:
        r = run_in_fresh_process("inference", model="tiny-llama", batch_size=1, seq=8,
                                 steps=1, warmup=0)
        _framework = float(r["rss_loaded_mb"])
    except (RuntimeError, KeyError, ValueError):
        return FRAMEWORK_MB
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "rss_mb": _framework}))
    except OSError:
        pass
    return _framework


def _layer_working_set(s: Shape, tokens: int, bpe: int) -> float:
    """Bytes alive inside one layer during a no-grad forward: the residual stream and its
    normalised copy, q/k/v and the attention output, and the MLP's (gated: two) ffn-wide
    intermediates and their activation."""
    ffn_tensors = 3 if s.family == "gated" else 2
    return tokens * bpe * (6 * s.hidden + ffn_tensors * s.ffn)


PAIR_BUDGET = 0.05  # zo-sgd's promise: about inference's memory (issue 3: within 5%)


def pair_passes_fit(config, trainable: str, batch: int, seq: int, dtype: str = "float32",
                    lora_rank: int = 8, lora_targets: list[str] | None = None,
                    shape: Shape | None = None) -> bool:
    """What `--zo-passes auto` picks: one pair-batched forward (z generated once, the faster)
    when LoRA is trained, or when the second batch's activations add at most PAIR_BUDGET to the
    run's estimated peak; else two sequential forwards. (Full parameters, default model:
    pair at 8 x 64, sequential at 16 x 128; OPT-1.3B: pair at 2 x 64, sequential at 16 x 128.)
    `shape`: `model_shape` of these settings when the caller has it (built once, not per call)."""
    if trainable == "lora":
        return True
    shape = shape or model_shape(config, dtype, lora_rank, lora_targets)
    kw = dict(dtype=dtype, lora_rank=lora_rank, lora_targets=lora_targets,
              framework=FRAMEWORK_MB, shape=shape)
    one = estimate(config, "zo-sgd", trainable, batch, seq, zo_passes="sequential", **kw).total
    two = estimate(config, "zo-sgd", trainable, batch, seq, zo_passes="pair", **kw).total
    return two <= (1 + PAIR_BUDGET) * one


def estimate(config, method: str, trainable: str, batch: int, seq: int,
             dtype: str = "float32", lora_rank: int = 8, zo_passes: str = "auto",
             lora_targets: list[str] | None = None, framework: float | None = None,
             shape: Shape | None = None) -> Estimate:
    """The estimated peak RSS of `method` (inference, zo-sgd, lora-adam, adam) on `config`
    at `batch` x `seq` tokens, by component (MiB). `shape`: its `model_shape`, if built."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: the estimate knows {', '.join(METHODS)}")
    if method == "adam" and trainable != "full" or method == "lora-adam" and trainable != "lora":
        raise ValueError(f"--method {method} trains {'full' if method == 'adam' else 'lora'} "
                         f"weights, not --trainable {trainable}")
    s = shape or model_shape(config, dtype, lora_rank, lora_targets)
    bpe = torch.finfo(getattr(torch, dtype)).bits // 8
    lora = trainable == "lora" and method != "inference"
    est = Estimate(method, trainable)
    c = est.components
    c["framework (python, torch, transformers)"] = (framework if framework is not None
                                                    else framework_mb()) + RUNTIME_SLACK_MB
    c["weights"] = s.param_bytes / MB
    if lora:
        c["LoRA weights (float32)"] = s.lora_params * 4 / MB

    # scored positions: every position of a causal LM's batch, one <mask> per row of a masked LM
    pair = method == "zo-sgd" and (zo_passes == "pair" or zo_passes == "auto" and pair_passes_fit(
        config, trainable, batch, seq, dtype, lora_rank, lora_targets, shape=s))
    rows = batch * (2 if pair else 1)
    tokens = rows * seq
    scored = rows if s.masked else rows * (seq - 1)
    chunks = math.ceil(s.vocab / 2048)
    chunk_rows = min(2048, s.vocab)
    working = _layer_working_set(s, tokens, bpe)
    # the final hidden states and the scored positions' copy, plus one chunk's logits: without
    # autograd two buffers reused by every chunk (the matmul's output and, below float32, its
    # float32 copy; exp() in place), with autograd the float32 logits, their exp() and more
    no_grad = method in ("inference", "zo-sgd")
    chunk_bytes = (bpe + (4 if bpe != 4 else 0)) if no_grad else 3 * 4
    loss_scratch = tokens * s.hidden * bpe + scored * s.hidden * bpe + \
        scored * chunk_rows * chunk_bytes
    if s.masked:  # the MLM head's dense + LayerNorm at the scored rows, then (rows, V) logits
        loss_scratch += 3 * scored * s.hidden * bpe + 2 * scored * s.vocab * 4

    if method in ("inference", "zo-sgd"):
        c["activations (one layer at a time)"] = (working + loss_scratch) / MB
        if method == "zo-sgd":
            signs = 2 if pair else 1
            # the scratch slot of a Linear weight (the embedding is perturbed row by row into
            # its lookup's output, the head chunk by chunk)
            largest = s.lora_largest * 4 if lora else s.largest_linear * bpe
            head = 0 if lora else chunk_rows * s.hidden * bpe
            embed = 0 if lora else tokens * s.hidden * bpe  # perturbed lookup, per group
            c["ZO scratch (perturbed copies)"] = (signs * (largest + head) + embed) / MB
            est.notes.append(f"zo-sgd {'pair' if pair else 'sequential'} passes: activations "
                             f"of {rows} rows")
        return est

    # first-order: every layer's saved tensors, the loss's, and the backward's temporaries
    ch, cf, ca = SAVED_PER_LAYER[(s.family, trainable, dtype)]
    saved = s.layers * tokens * (ch * s.hidden + cf * s.ffn + ca * s.heads)
    # the chunked loss saves, per chunk, its float32 logits (for gather) and their exp(), and
    # the scored hidden states it multiplied (a copy per chunk)
    loss_saved = 2 * scored * s.vocab * 4 + chunks * scored * s.hidden * bpe
    if s.masked:
        loss_saved += 4 * scored * s.hidden * bpe
    kept = saved + loss_saved + tokens * s.hidden * bpe
    n_train = s.lora_params if lora else s.params
    train_bpe = 4 if lora else bpe  # LoRA A/B are float32
    grads = n_train * train_bpe
    temp = s.lora_largest * 4 if lora else s.largest * bpe
    c["optimizer state (AdamW: 2 moments)"] = 2 * n_train * train_bpe / MB
    # The backward's first gradient is the head's (vocab x hidden; all of A/B for LoRA, tiny)
    # while every activation is still kept; the last moment is all gradients and no activations.
    first_grad = grads if lora else s.vocab * s.hidden * bpe
    start = (1 + AUTOGRAD_HEAP_OVERHEAD) * kept + working + loss_scratch + first_grad
    step = grads + temp
    if start >= step:
        c["activations kept for backward"] = kept / MB
        c["heap fragmentation (autograd)"] = AUTOGRAD_HEAP_OVERHEAD * kept / MB
        c["backward temporaries (one layer)"] = (working + loss_scratch) / MB
        c["gradients (the head's, first)" if not lora else "gradients"] = first_grad / MB
        est.notes.append(f"peak at the start of backward (activations {kept / MB:.0f} MB > "
                         f"gradients {grads / MB:.0f} MB)")
    else:
        c["gradients"] = grads / MB
        c["AdamW step temporary"] = temp / MB
        est.notes.append(f"peak at the optimizer step (gradients {grads / MB:.0f} MB > "
                         f"activations {kept / MB:.0f} MB, freed by then)")
    return est


def saved_activation_bytes(model, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `model.base_model`
    (distinct storages, parameters excluded): how `SAVED_PER_LAYER` was measured."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sum(seen.values())

"""Will it fit? Peak RSS of a run estimated from the model's config alone.

    estimate(config, method, trainable, batch, seq, dtype, ..., **settings) -> Estimate

`method` is a training method's class, whose `memory_profile(cfg, run, shape)` says which kind
of peak it makes with its settings `cfg` (`settings`, as its flags), or a `Profile` itself;
`Inference` is the memory command's pseudo-method, a forward without training. The model is
built on the meta device (shapes, no memory) to count its parameters exactly; everything else is
arithmetic on the config:

* weights: every parameter and buffer once (tied ones once), plus LoRA A/B (float32);
* activations, by kind of peak:
  - `NoGradForward` (inference, zeroth-order methods, split mode's device): no autograd, so
    about one layer's working set at a time (`_layer_working_set`) plus the loss's scratch: the
    output head is streamed in `loss.VOCAB_CHUNK`-row chunks, so only a (scored positions x
    2048) block of logits exists at once. A zeroth-order forward runs over R replicas of the
    batch (zo-sgd: 2 for pair passes, 1 sequential; prge: up to 2q) and adds the Perturber's
    scratch (`pocketllm.zo.perturb`): one buffer per replica for the largest trainable weight
    (the copies are built just in time, per module, into reused buffers), one per replica for a
    head chunk, and a perturbed embedding lookup;
  - `Backprop` (lora-adam, adam) keeps every layer's saved tensors for the backward pass. The
    bytes per token per layer come from `SAVED_PER_LAYER`, measured by tracing the saved tensors
    of each architecture family with `saved_activation_bytes` (tests/test_memory_estimate.py
    re-derives them), plus the chunked loss's saved tensors (its float32 exp() per chunk:
    4 bytes per scored position per vocabulary row, and one copy of the scored hidden states per
    chunk), plus one layer's working set for the backward's own temporaries. Checkpointed
    (--activation-checkpointing): each layer's input (hidden x bytes per token per layer) and
    one layer's saved tensors, rebuilt in the backward, and the loss's input alone;
* gradients: one per trainable weight, in its dtype (adam: the whole model; lora-adam: A, B);
* optimizer state: AdamW's two moments per trainable weight, plus its per-tensor temporary;
* framework: the Python + torch + transformers process before any weights (measured in this
  process when it has imported them, else `FRAMEWORK_MB`).

First-order peak: the backward starts with every activation saved and frees them layer by layer
while the gradients fill in, so the peak is weights + optimizer state + the larger of (saved
activations + the head's gradient, which comes first) and (all gradients + the AdamW
temporary). Scored positions: a causal LM's workload scores every position (the dense case,
`pocketllm.workload`); a masked LM scores one <mask> per row.

Imports nothing of pocketllm.methods (the methods import this module for their profiles).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

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
# The same with activation checkpointing, relative to its much smaller kept activations (layer
# inputs): each layer rebuilt and differentiated in the backward leaves a few MB of the heap
# split (measured: RSS beyond the live bytes = 1.7-2.4 x the kept activations for lora-adam
# on smollm2-135m, float32, 4 x 64 to 16 x 128; glibc's heap, mmap threshold 32 MB).
CHECKPOINT_HEAP_OVERHEAD = 2.2

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
# The small trainable sets without a measured profile of their own (pocketllm.trainable): each is
# estimated as a float32 adapter of its size (the norms' scales; `VIRTUAL_TOKENS` embeddings)
# whose backward saves what the measured set named here saves (norm: the norms' inputs as well,
# as full fine-tuning does; prefix: activations only, as LoRA; head: `HEAD_ROWS` rows of the
# output head, as LoRA, which over-counts a backward that needs nothing below the head).
# Rough: never measured.
ROUGH_SETS = {"norm": "full", "prefix": "lora", "head": "lora"}
VIRTUAL_TOKENS = 8  # --num-virtual-tokens' default
HEAD_ROWS = 8  # --trainable head: a few answer tokens (the demo's: 7)
# the vectors of `hidden` numbers a set sized by count holds
ROUGH_VECTORS = {"prefix": VIRTUAL_TOKENS, "head": HEAD_ROWS}

# architecture family by model_type: gated MLP (3 ffn matrices), ReLU/GELU MLP, encoder (MLM)
FAMILY = {"llama": "gated", "mistral": "gated", "qwen2": "gated", "qwen3": "gated",
          "gemma": "gated", "gemma2": "gated", "gemma3_text": "gated", "phi3": "gated",
          "opt": "relu", "gpt2": "relu", "roberta": "encoder", "bert": "encoder",
          "xlm-roberta": "encoder"}


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
    norm_params: int = 0   # the normalisation layers' scales and biases
    norm_largest: int = 0
    # (out, in) of each Linear a quantized base stores quantized (`quantize.base_linears`)
    base_linears: tuple = ()
    # (rows, cols) of the embedding table (and an untied head) it stores as int8 rows
    base_tables: tuple = ()


@dataclass
class Estimate:
    """The breakdown, in MiB; `total` is the estimated peak RSS."""

    method: str
    trainable: str
    components: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warmup: int = 0  # steps a measurement runs first, unmeasured (state that exists from step 2)

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


class BadLayers(ValueError):
    """--lora-layers names layers the model does not have."""


def model_shape(config, dtype: str = "float32", lora_rank: int = 8,
                lora_targets: list[str] | None = None, lora_layers: str = "") -> Shape:
    """Parameter counts from a meta-device build of `config`; layer sizes from its fields.
    `lora_layers`: LoRA on these layers only (`--lora-layers`, `lora.select_layers`'s text).
    Raises UnknownShape where the config cannot be read that way."""
    try:
        return _model_shape(config, dtype, lora_rank, lora_targets, lora_layers)
    except BadLayers:
        raise  # the run's setting, not the config: its own message
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UnknownShape(f"cannot estimate model_type "
                           f"{getattr(config, 'model_type', '?')!r}: {e}") from e


def _model_shape(config, dtype: str, lora_rank: int, lora_targets: list[str] | None,
                 lora_layers: str = "") -> Shape:
    from .lora import _matches, default_targets, layer_of, select_layers
    from .trainable import is_norm
    from .models import MASKED_LM_TYPES

    model = _meta_model(config)
    bpe = _bytes_per(dtype)
    params = list(model.parameters())  # distinct: tied weights once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    targets = list(lora_targets or default_targets(model))
    try:
        chosen = select_layers(model, targets, lora_layers)  # None: every layer
    except ValueError as e:
        raise BadLayers(str(e)) from None
    lora, lora_largest, largest_linear, norm, norm_largest = 0, 0, 0, 0, 0
    head = model.get_output_embeddings()
    layers = _get(config, "num_hidden_layers", "n_layer")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            largest_linear = max(largest_linear, mod.weight.numel())
        if (isinstance(mod, torch.nn.Linear) and _matches(name, targets)
                and (chosen is None or layer_of(name) in chosen)):
            n = lora_rank * (mod.in_features + mod.out_features)
            lora += n
            lora_largest = max(lora_largest, lora_rank * max(mod.in_features, mod.out_features))
        if is_norm(mod):
            for p in mod.parameters(recurse=False):
                norm += p.numel()
                norm_largest = max(norm_largest, p.numel())
    from .quantize import base_linears, base_tables
    quantizable = tuple((m.out_features, m.in_features) for _, m in base_linears(model))
    mt = config.model_type
    return Shape(base_linears=quantizable, base_tables=tuple(base_tables(model)),
        family=FAMILY.get(mt, "gated"), masked=mt in MASKED_LM_TYPES, layers=layers,
        hidden=_get(config, "hidden_size", "n_embd"),
        ffn=_get(config, "intermediate_size", "ffn_dim", "n_inner", default=None)
        or 4 * _get(config, "hidden_size", "n_embd"),
        heads=_get(config, "num_attention_heads", "n_head"), vocab=config.vocab_size,
        params=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() for p in params) * bpe + buffers,
        largest=max(p.numel() for p in params), largest_linear=largest_linear,
        lora_params=lora, lora_largest=lora_largest, norm_params=norm,
        norm_largest=norm_largest)


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


@dataclass(frozen=True)
class Sizes:
    """A run's sizes, by the names `TrainArgs` gives them (what a `memory_profile` reads)."""

    trainable: str
    batch_size: int
    max_seq_length: int
    dtype: str = "float32"
    lora_rank: int = 8
    lora_targets: tuple = ()
    lora_layers: str = ""


@dataclass(frozen=True)
class Forward:
    """What one forward over `rows` rows of a batch holds besides the weights (bytes)."""

    rows: int
    tokens: int
    scored: int     # positions the loss scores
    working: int    # one layer's working set (`_layer_working_set`)
    loss: int       # the loss's scratch: final hidden states, the scored ones, a head chunk


def forward(s: Shape, rows: int, seq: int, bpe: int, autograd: bool,
            head: bool = True) -> Forward:
    """The activations of one forward over `rows` rows of `seq` tokens. Scored positions:
    every position of a causal LM's batch, one <mask> per row of a masked LM. `head`: whether
    the output head's loss runs (False: the forward stops at the final hidden states)."""
    tokens = rows * seq
    scored = rows if s.masked else rows * (seq - 1)
    # the final hidden states and the scored positions' copy, plus one chunk's logits: without
    # autograd two buffers reused by every chunk (the matmul's output and, below float32, its
    # float32 copy; exp() in place), with autograd the float32 logits, their exp() and more
    chunk_bytes = 3 * 4 if autograd else bpe + (4 if bpe != 4 else 0)
    loss = tokens * s.hidden * bpe + scored * s.hidden * bpe
    if head:
        loss += scored * min(2048, s.vocab) * chunk_bytes
        if s.masked:  # the MLM head's dense + LayerNorm at the scored rows, then (rows, V) logits
            loss += 3 * scored * s.hidden * bpe + 2 * scored * s.vocab * 4
    return Forward(rows, tokens, scored, _layer_working_set(s, tokens, bpe), loss)


class Profile:
    """One kind of peak: what a run of this kind holds at its highest point, beyond the
    framework and the weights. A method's `memory_profile` returns one."""

    adapter: bool = True  # the trainable set (--trainable lora, norm, prefix) is part of the
    #                       run (False: frozen)
    warmup: int = 0       # steps a measurement runs first, unmeasured

    def fill(self, est: Estimate, s: Shape, run: Sizes, lora: bool) -> None:
        """Add this kind's components (MiB) and notes to `est`; `lora`: a small float32 set
        trains, of `s.lora_params` numbers (LoRA A/B, or a `ROUGH_SETS` set sized as one)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoGradForward(Profile):
    """A forward without autograd over `replicas` copies of the batch, one layer alive at a
    time. `perturbed`: each replica sees its own perturbed weights (the Perturber's scratch,
    per replica); `head`: the output head's loss runs on this machine; `extra`: components the
    method adds, (name, MiB); `state`: what the run holds as copies of its trainable tensors,
    (what, copies, of what: "float32" / "param", the whole trainable set in float32 / its own
    dtype, e.g. ZO-Adam's two moments, svrg's anchor; "largest", float32 copies of the largest
    trainable tensor, a step's temporaries); `what`: the subject of a note on the rows it runs; `notes`: more."""

    replicas: int = 1
    perturbed: bool = False
    head: bool = True
    adapter: bool = True
    what: str = ""
    extra: tuple[tuple[str, float], ...] = ()
    state: tuple[tuple[str, int, str], ...] = ()
    notes: tuple[str, ...] = ()

    def fill(self, est: Estimate, s: Shape, run: Sizes, lora: bool) -> None:
        bpe = _bytes_per(run.dtype)
        f = forward(s, run.batch_size * self.replicas, run.max_seq_length, bpe, autograd=False,
                    head=self.head)
        c = est.components
        c["activations (one layer at a time)"] = (f.working + f.loss) / MB
        if self.perturbed:
            # the scratch slot of a Linear weight (the embedding is perturbed row by row into
            # its lookup's output, the head chunk by chunk)
            largest = s.lora_largest * 4 if lora else s.largest_linear * bpe
            head = 0 if lora else min(2048, s.vocab) * s.hidden * bpe
            embed = 0 if lora else f.tokens * s.hidden * bpe  # perturbed lookup, per group
            c["ZO scratch (perturbed copies)"] = (self.replicas * (largest + head) + embed) / MB
        c.update(self.extra)
        for what, copies, of in self.state:  # a LoRA / small set is float32 either way
            if of == "largest":
                n, unit = (s.lora_largest if lora else s.largest), "largest tensor"
            else:
                n, unit = (s.lora_params if lora else s.params), "trainable"
            c[f"{what} ({copies} x {unit})"] = \
                copies * n * (4 if lora or of != "param" else bpe) / MB
        if self.what:
            est.notes.append(f"{self.what}: activations of {f.rows} rows")
        est.notes.extend(self.notes)


@dataclass(frozen=True)
class Backprop(Profile):
    """Autograd through the whole forward and a backward pass, AdamW on the trainable weights:
    every layer's saved tensors, then gradients and two moments per trainable weight.
    `checkpointed` (--activation-checkpointing): only each layer's input is kept, the layer's
    saved tensors rebuilt one layer at a time in the backward, and the head loss saves no
    chunk's logits (`loss.recomputed_head`)."""

    checkpointed: bool = False
    warmup: ClassVar[int] = 1  # AdamW's state exists from the second step on

    def fill(self, est: Estimate, s: Shape, run: Sizes, lora: bool) -> None:
        bpe = _bytes_per(run.dtype)
        f = forward(s, run.batch_size, run.max_seq_length, bpe, autograd=True)
        c = est.components
        # one layer's saved tensors (SAVED_PER_LAYER; a small trainable set as its rough kin)
        saved_as = ROUGH_SETS.get(run.trainable, run.trainable)
        ch, cf, ca = SAVED_PER_LAYER[(s.family, saved_as, run.dtype)]
        layer = f.tokens * (ch * s.hidden + cf * s.ffn + ca * s.heads)
        if self.checkpointed:
            # every layer's input, and the one layer rebuilt at a time in the backward; the
            # head loss keeps its input, the scored hidden states, and (LoRA) their gradient's
            # float32 softmax-weighted mean of the head's rows
            saved = s.layers * f.tokens * s.hidden * bpe + layer
            loss_saved = f.scored * s.hidden * (bpe + 4)
        else:
            # every layer's saved tensors; the chunked loss saves, per chunk, its float32 logits
            # (for gather) and their exp(), and the scored hidden states it multiplied (a copy
            # per chunk)
            saved = s.layers * layer
            loss_saved = (2 * f.scored * s.vocab * 4
                          + math.ceil(s.vocab / 2048) * f.scored * s.hidden * bpe)
        if s.masked:
            loss_saved += 4 * f.scored * s.hidden * bpe
        kept = saved + loss_saved + f.tokens * s.hidden * bpe
        n_train = s.lora_params if lora else s.params
        train_bpe = 4 if lora else bpe  # LoRA A/B are float32
        grads = n_train * train_bpe
        temp = s.lora_largest * 4 if lora else s.largest * bpe
        c["optimizer state (AdamW: 2 moments)"] = 2 * n_train * train_bpe / MB
        # The backward's first gradient is the head's (vocab x hidden; all of A/B for LoRA,
        # tiny) while every activation is still kept; the last moment is all gradients and no
        # activations.
        first_grad = grads if lora else s.vocab * s.hidden * bpe
        # Checkpointed, the gradients stay allocated from step to step (FirstOrderAdamW.step):
        # every one is there through the backward, the head's next one arriving on top.
        held = grads if self.checkpointed and not lora else 0
        heap = CHECKPOINT_HEAP_OVERHEAD if self.checkpointed else AUTOGRAD_HEAP_OVERHEAD
        start = (1 + heap) * kept + f.working + f.loss + first_grad + held
        step = grads + temp
        if start >= step:
            c["activations kept for backward" + (" (layer inputs, one layer rebuilt)"
                                                 if self.checkpointed else "")] = kept / MB
            c["heap fragmentation (autograd)"] = heap * kept / MB
            c["backward temporaries (one layer)"] = (f.working + f.loss) / MB
            if held:
                c["gradients (kept from step to step)"] = held / MB
            c["gradients (the head's, first)" if not lora else "gradients"] = first_grad / MB
            est.notes.append(
                "peak in the backward (every gradient held, one layer rebuilt at a time)"
                if held else f"peak at the start of backward (activations {kept / MB:.0f} MB"
                f" > gradients {grads / MB:.0f} MB)")
        else:
            c["gradients"] = grads / MB
            c["AdamW step temporary"] = temp / MB
            est.notes.append(f"peak at the optimizer step (gradients {grads / MB:.0f} MB > "
                             f"activations {kept / MB:.0f} MB, freed by then)")


@dataclass
class NoSettings:
    """A memory entry without settings of its own."""


class Inference:
    """`pocketllm memory --method inference`: the model's forward and loss, nothing trained.
    A pseudo-method of the memory command and the workload (not in the method registry): the
    yardstick the methods' estimates are read against."""

    name = "inference"
    Config = NoSettings
    trainable_kinds = ("full",)  # the model as loaded: no adapter
    trains_model = False

    @classmethod
    def memory_profile(cls, cfg, run: Sizes, shape: Shape) -> Profile:
        return NoGradForward(adapter=False)


def _bytes_per(dtype: str) -> int:
    return torch.finfo(getattr(torch, dtype)).bits // 8


PAIR_BUDGET = 0.05  # zo-sgd's promise: about inference's memory (issue 3: within 5%)


def pair_passes_fit(config, trainable: str, batch: int, seq: int, dtype: str = "float32",
                    lora_rank: int = 8, lora_targets: list[str] | None = None,
                    shape: Shape | None = None) -> bool:
    """What `--zo-passes auto` picks: one pair-batched forward (z generated once, the faster)
    when LoRA is trained, or when the second batch's activations add at most PAIR_BUDGET to the
    run's estimated peak; else two sequential forwards. (Full parameters, default model:
    pair at 8 x 64, sequential at 16 x 128; OPT-1.3B: pair at 2 x 64, sequential at 16 x 128.)
    `shape`: `model_shape` of these settings when the caller has it (built once, not per call;
    `config` is not read then)."""
    if trainable == "lora":
        return True
    shape = shape or model_shape(config, dtype, lora_rank, lora_targets)
    kw = dict(dtype=dtype, lora_rank=lora_rank, lora_targets=lora_targets,
              framework=FRAMEWORK_MB, shape=shape)
    one = estimate(config, NoGradForward(1, perturbed=True), trainable, batch, seq, **kw).total
    two = estimate(config, NoGradForward(2, perturbed=True), trainable, batch, seq, **kw).total
    return two <= (1 + PAIR_BUDGET) * one


def estimate(config, method, trainable: str, batch: int, seq: int,
             dtype: str = "float32", lora_rank: int = 8,
             lora_targets: list[str] | None = None, framework: float | None = None,
             shape: Shape | None = None, lora_layers: str = "", quantize: str = "none",
             **settings) -> Estimate:
    """The estimated peak RSS of `method` on `config` at `batch` x `seq` tokens, by component
    (MiB). `method`: a method class (its `memory_profile`, with its settings `settings`, e.g.
    zo_passes="pair"; `Inference`) or a `Profile`. `shape`: its `model_shape`, if built.
    `quantize`: the base's Linears stored in that `pocketllm.quantize` scheme."""
    name = getattr(method, "name", None) or type(method).__name__
    if not isinstance(method, Profile):
        if not hasattr(method, "memory_profile"):
            raise ValueError(f"estimate: {method!r} is neither a memory profile nor a method "
                             "class (pocketllm.methods.get_method(name), memory_estimate."
                             "Inference)")
        kinds = method.trainable_kinds
        if getattr(method, "trains_model", True) and trainable not in kinds:
            raise ValueError(f"--method {name} trains {'/'.join(kinds)} weights, not "
                             f"--trainable {trainable}")
    elif settings:
        raise ValueError(f"estimate: settings {sorted(settings)} given with a profile")
    s = shape or model_shape(config, dtype, lora_rank, lora_targets, lora_layers)
    run = Sizes(trainable, batch, seq, dtype, lora_rank, tuple(lora_targets or ()), lora_layers)
    profile = method if isinstance(method, Profile) else _profile(method, name, run, s, settings)
    lora = trainable != "full" and profile.adapter  # a small float32 set trains
    if lora and trainable in ROUGH_SETS:
        s = _sized_as_adapter(s, trainable)
        est_note = (f"--trainable {trainable}: a rough estimate, as an adapter of "
                    f"{s.lora_params} numbers (not measured)")
    else:
        est_note = None
    est = Estimate(name, trainable, warmup=profile.warmup)
    c = est.components
    c["framework (python, torch, transformers)"] = (framework if framework is not None
                                                    else framework_mb()) + RUNTIME_SLACK_MB
    c["weights"] = s.param_bytes / MB
    if quantize != "none":
        from .quantize import check_scheme
        scheme, bpe = check_scheme(quantize), _bytes_per(dtype)
        float_b = sum(o * i * bpe for o, i in s.base_linears)
        quant_b = sum(scheme.nbytes(o, i, bpe) for o, i in s.base_linears)
        c["weights"] = (s.param_bytes - float_b) / MB
        c[f"base Linear weights ({quantize})"] = quant_b / MB
        if scheme.tables and s.base_tables:
            c["weights"] -= sum(r * k * bpe for r, k in s.base_tables) / MB
            c["embedding table (int8 rows)"] = sum(scheme.table_nbytes(r, k, bpe)
                                                   for r, k in s.base_tables) / MB
    if lora:
        c[f"{'LoRA' if trainable == 'lora' else trainable} weights (float32)"] = \
            s.lora_params * 4 / MB
    profile.fill(est, s, run, lora)
    if est_note:
        est.notes.append(est_note)
    return est


def _sized_as_adapter(s: Shape, trainable: str) -> Shape:
    """`s` with its adapter figures those of the `ROUGH_SETS` set `trainable`."""
    if trainable == "norm":
        return dataclasses.replace(s, lora_params=s.norm_params, lora_largest=s.norm_largest)
    n = ROUGH_VECTORS[trainable] * s.hidden
    return dataclasses.replace(s, lora_params=n, lora_largest=n)


def _profile(method, name: str, run: Sizes, s: Shape, settings: dict) -> Profile:
    """The profile a method class declares for its settings on this run."""
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(method.Config)})
    if unknown:
        raise ValueError(f"--method {name} has no setting "
                         f"{', '.join('--' + u.replace('_', '-') for u in unknown)}")
    cfg = method.Config(**settings)
    profile = method.memory_profile(cfg, run, s)
    if profile is None:
        raise ValueError(f"--method {name} has no memory profile: its class declares none "
                         "(a `memory_profile` classmethod returning a memory_estimate.Profile)")
    return profile


def saved_activation_bytes(model, batch: dict[str, torch.Tensor], forward=None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `model.base_model`
    (distinct storages, parameters excluded): how `SAVED_PER_LAYER` was measured. `forward`:
    another forward to trace instead (a callable; e.g. the objective's loss, head included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if forward is not None:
            forward()
        else:
            model.base_model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"])
    return sum(seen.values())

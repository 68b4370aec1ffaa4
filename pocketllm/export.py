"""Export a fine-tuned model for inference (`pocketllm export`) and generate from the exported
file (`pocketllm generate --engine executorch|onnxruntime --program FILE`): what a user ships.

    pte   an ExecuTorch program, XNNPACK-delegated (pip install pocketllm[executorch])
    onnx  an ONNX model for ONNX Runtime (pip install pocketllm[onnx])

The exported function is `NextToken`: tokens (1, L) int64, right-padded to the program's fixed
length L (`--max-len`), and `length` (1,) int64 -> the logits of the token after the first
`length` tokens (1, vocab) float32. The attention is causal, so the padding after `length`
never reaches the positions read. Generation recomputes the whole prefix for every new token:
no KV cache in this first version (a prompt plus its continuation fits in L tokens; what does
not is cut, and said so).

The trained set is merged into the float base first (LoRA folded into the weights; norm scales
are the model's own; the answer rows' offsets of `--trainable head` stay beside the tied table,
added to their logits); a prompt-tuning prefix cannot be merged and is refused. The output head is
computed as mm(W, h^T) on the weight as stored: with tied embeddings the table is one constant,
stored once (`lm_head(h)` would make XNNPACK pack a second, transposed copy: the .pte doubled
by the table). A file `FILE.json` beside the program says what it is (model, its tokenizer's
name, L, format). A format is one entry of `FORMATS`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .head_rows import rows_head
from .loss import backbone, is_masked_lm, output_head

SIDECAR = ".json"  # FILE + this: what the program is


class ExportError(SystemExit):
    """A refusal or a missing extra, said in one line."""


class NextToken(nn.Module):
    """tokens (1, L), length (1,) -> the next token's logits (1, vocab), float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma's
        # trained answer rows (--trainable head) stay an offset beside the tied table: their
        # logits added through a (rows x vocab) one-hot, matmuls only (every engine has them)
        self.rows = rows_head(model)
        if self.rows is not None:
            vocab = self.rows.weight.shape[0]
            self.register_buffer("row_select", torch.nn.functional.one_hot(
                self.rows.ids, vocab).float(), persistent=False)

    def forward(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        h = backbone(self.model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
        last = h.index_select(1, length - 1)[:, 0]  # (1, H)
        head = output_head(self.model)
        logits = torch.mm(head.weight, last.t()).t()  # W as stored (see the module docstring)
        if self.rows is not None:
            logits = logits + torch.mm(torch.mm(last, self.rows.delta.t()), self.row_select)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


# ---- formats: write a NextToken, run one --------------------------------------------------
def _need(module: str, extra: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ExportError(f"error: {what} needs {module}: pip install pocketllm[{extra}]") from None


def _write_pte(wrapper: NextToken, example: tuple, out: Path) -> None:
    _need("executorch.exir", "executorch", "--format pte")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    ep = torch.export.export(wrapper, example, strict=False)
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(program.buffer)


def _write_onnx(wrapper: NextToken, example: tuple, out: Path) -> None:
    _need("onnxruntime", "onnx", "--format onnx")
    _need("onnxscript", "onnx", "--format onnx")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(wrapper, example, str(out), input_names=["tokens", "length"],
                          output_names=["logits"], dynamo=True, external_data=False)


class ExecuTorchRunner:
    """An exported .pte run by ExecuTorch's Python runtime (the stand-in for a phone's)."""

    def __init__(self, path: str):
        _need("executorch.runtime", "executorch", "--engine executorch")
        from executorch.runtime import Runtime
        self.method = Runtime.get().load_program(path).load_method("forward")

    def __call__(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return self.method.execute([tokens, length])[0]


class OnnxRunner:
    """An exported .onnx run by ONNX Runtime."""

    def __init__(self, path: str):
        ort = _need("onnxruntime", "onnx", "--engine onnxruntime")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def __call__(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"tokens": tokens.numpy(), "length": length.numpy()})
        return torch.from_numpy(out[0])


@dataclass(frozen=True)
class Format:
    name: str
    engine: str      # the --engine of `generate` that runs it
    suffix: str
    write: Callable[[NextToken, tuple, Path], None]
    runner: Callable[[str], Callable]


FORMATS = {f.name: f for f in (
    Format("pte", "executorch", ".pte", _write_pte, ExecuTorchRunner),
    Format("onnx", "onnxruntime", ".onnx", _write_onnx, OnnxRunner),
)}
ENGINES = {f.engine: f for f in FORMATS.values()}  # generate's --engine (and torch: eager)


# ---- export --------------------------------------------------------------------------------
def merged_model(name: str, adapter_path: str = "", dtype: str = "float32"):
    """The float model with the trained set in `adapter_path` merged (none: the base)."""
    from .models import load_model
    from .trainable import load_saved
    model, tok = load_model(name, dtype)
    if is_masked_lm(model):
        raise ExportError(f"error: export: {name} is a masked LM; export generates with a "
                          "causal LM")
    if adapter_path:
        try:
            spec = load_saved(model, adapter_path)
        except (OSError, ValueError) as e:
            raise ExportError(f"error: --adapter-path {adapter_path}: {e}") from None
        refused = getattr(spec, "export_refused", "")  # a set the export cannot hold
        if refused:
            raise ExportError(f"error: --adapter-path {adapter_path}: {refused}")
        if not getattr(spec, "exported_unmerged", False):
            spec.merge(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def export(args) -> Path:
    """Write `args.model` with `args.adapter_path` merged to `args.out` in `args.format`
    (`ExportArgs`); returns the path. Also FILE.json (`read_sidecar`)."""
    fmt = FORMATS[args.format]
    out = Path(args.out or f"model{fmt.suffix}")
    model, tok = merged_model(args.model, args.adapter_path, args.dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.max_len > limit:
        raise ExportError(f"error: --max-len {args.max_len} is more than {args.model}'s "
                          f"{limit} positions")
    example = (torch.zeros(1, args.max_len, dtype=torch.long), torch.tensor([1]))
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fmt.write(NextToken(model).eval(), example, out)
    meta = {"format": fmt.name, "engine": fmt.engine, "model": args.model,
            "adapter": str(args.adapter_path), "max_len": args.max_len,
            "vocab": int(output_head(model).weight.shape[0]),
            "eos_token_id": tok.eos_token_id, "export_seconds": round(time.time() - t0, 1),
            "bytes": out.stat().st_size}
    Path(str(out) + SIDECAR).write_text(json.dumps(meta, indent=2))
    return out


def read_sidecar(program: str) -> dict:
    path = Path(str(program) + SIDECAR)
    if not program:
        raise ExportError("error: --engine executorch / onnxruntime runs an exported program: "
                          "give --program FILE (pocketllm export writes one)")
    if not Path(program).is_file():
        raise ExportError(f"error: --program {program}: no such file (pocketllm export writes "
                          "one)")
    if not path.is_file():
        raise ExportError(f"error: --program {program}: {path.name} is missing beside it (it "
                          "is written by pocketllm export)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"error: {path}: not valid JSON: {e}") from None


# ---- generation from a program -----------------------------------------------------------
def load_runner(engine: str, program: str) -> tuple[Callable, dict]:
    """The runner of `program` for `engine` and its sidecar; refuses a mismatch."""
    meta = read_sidecar(program)
    if engine not in ENGINES:
        raise ExportError(f"error: --engine {engine}: a program runs on "
                          f"{' or '.join(ENGINES)}")
    if ENGINES[engine].name != meta.get("format"):
        raise ExportError(f"error: --program {program} is a {meta.get('format')} file: run it "
                          f"with --engine {FORMATS[meta['format']].engine}"
                          if meta.get("format") in FORMATS else
                          f"error: {program}{SIDECAR}: unknown format {meta.get('format')!r}")
    return ENGINES[engine].runner(str(program)), meta


@torch.no_grad()
def generate_ids(next_logits: Callable, prompt_ids: list[int], max_len: int, max_tokens: int,
                 eos: int | None = None, temp: float = 0.0, seed: int = 0) -> tuple[list[int], bool]:
    """Greedy (temp 0) or sampled continuation ids, recomputing the prefix each token
    (`next_logits(tokens (1, max_len), length (1,))`). Also whether it stopped at max_len."""
    if not prompt_ids:
        raise ExportError("error: --prompt is empty (the program needs at least one token)")
    if len(prompt_ids) >= max_len:
        raise ExportError(f"error: the prompt is {len(prompt_ids)} tokens and the program holds "
                          f"{max_len}: export again with a larger --max-len")
    g = torch.Generator().manual_seed(seed)
    ids, new = list(prompt_ids), []
    while len(new) < max_tokens:
        if len(ids) >= max_len:
            return new, True
        buf = torch.zeros(1, max_len, dtype=torch.long)
        buf[0, :len(ids)] = torch.tensor(ids)
        logits = next_logits(buf, torch.tensor([len(ids)]))[0].float()
        nxt = (int(torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=g))
               if temp > 0 else int(logits.argmax()))
        if eos is not None and nxt == eos:
            break
        ids.append(nxt)
        new.append(nxt)
    return new, False


def generate_from_program(engine: str, program: str, prompt: str, max_tokens: int = 64,
                          temp: float = 0.0, chat: bool = False, seed: int = 0,
                          tokenizer=None) -> tuple[str, bool]:
    """The continuation of `prompt` by an exported program (`pocketllm export`), decoded;
    and whether it stopped at the program's length."""
    runner, meta = load_runner(engine, program)
    if tokenizer is None:
        from .models import load_tokenizer
        tokenizer = load_tokenizer(meta["model"])
    text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True) if chat else prompt)
    ids = tokenizer(text)["input_ids"]
    new, cut = generate_ids(runner, ids, int(meta["max_len"]), max_tokens,
                            meta.get("eos_token_id"), temp, seed)
    return tokenizer.decode(new, skip_special_tokens=True), cut

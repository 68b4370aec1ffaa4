"""LoRA layers, injection into a HF model, PEFT-format adapter I/O, and merging.

Our own small LoRA instead of peft's because the zeroth-order methods need to run one layer
with several perturbed copies of its adapter at once (see `LoRALinear.forward_groups`), which
peft does not offer. Adapters are saved and loaded in PEFT's format
(`adapter_config.json` + `adapter_model.safetensors`), so peft can load ours and we can load
peft's.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from . import adapter
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: F401  (where they were)
from .quantize import Int4Linear

# the layers LoRA wraps: torch's and GPT-2's linear layers, and a 4-bit base (--quantize-base;
# torchao's int8 keeps nn.Linear)
LINEAR = (nn.Linear, Conv1D, Int4Linear)

PEFT_PREFIX = "base_model.model."

# Default targets per architecture (the attention query/value projections, as in LoRA and MeZO).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "roberta": ["query", "value"],  # as MeZO's RoBERTa-large LoRA runs
    "bert": ["query", "value"],
}
FALLBACK_TARGETS = ["q_proj", "v_proj"]


@dataclass
class LoraSpec:
    """What to adapt and how; saved as PEFT's LoraConfig fields (`layers`: the decoder layers
    adapted, PEFT's `layers_to_transform`; None: every layer)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(FALLBACK_TARGETS))
    layers: list[int] | None = None

    # the saved-trainable-set interface (`pocketllm.trainable`)
    kind: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    def save(self, model: nn.Module, path: str | os.PathLike, base_model: str,
             metadata: dict[str, str] | None = None) -> Path:
        """The adapter in PEFT's format (`save_adapter`)."""
        return save_adapter(model, path, self, base_model, metadata)

    @staticmethod
    def load(model: nn.Module, path: str | os.PathLike) -> "LoraSpec":
        """Inject and load the adapter saved at `path` (`load_adapter`)."""
        return load_adapter(model, path)

    def merge(self, model: nn.Module) -> int:
        """Fold the adapter into the base weights (`merge_lora`); the layers merged."""
        return merge_lora(model)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(x)), around an nn.Linear or GPT-2 Conv1D (fan-in/fan-out)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, Conv1D):
            in_f, out_f = base.weight.shape
        elif isinstance(base, (nn.Linear, Int4Linear)):
            out_f, in_f = base.out_features, base.in_features
        else:
            raise TypeError(f"LoRA supports nn.Linear and Conv1D, not {type(base).__name__}")
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.scaling = r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters stay in float32 even on a bfloat16 base: they are tiny, and float32 keeps
        # small zeroth-order updates from rounding away.
        dev = next(base.buffers(), None) if isinstance(base, Int4Linear) else base.weight
        dev = dev.device
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        d = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (d * self.scaling).to(y.dtype)

    def forward_groups(self, x: torch.Tensor, As: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
        """Rows of x split into G equal groups along dim 0; group g uses adapter (As[g], Bs[g]).

        As: (G, r, in), Bs: (G, out, r); either may have G = 1 to share one factor across the
        groups (LoRA-FA's frozen A). One batched matmul per factor, no loop over groups: the
        frozen base is applied once to all rows (it is read from memory once).
        """
        y = self.base_layer(x)
        G = max(As.shape[0], Bs.shape[0])
        xd = self.dropout(x).to(As.dtype)
        if As.shape[0] == 1:  # shared A: one plain matmul, then split the rows into groups
            xa = F.linear(xd, As[0]).reshape(G, -1, self.r)
        else:
            xa = torch.bmm(xd.reshape(G, -1, self.in_features), As.transpose(1, 2))
        d = torch.bmm(xa, Bs.transpose(1, 2).expand(G, -1, -1))
        return y + (d.reshape(y.shape) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The merged update in the base layer's weight layout."""
        dw = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return dw.T if isinstance(self.base_layer, Conv1D) else dw


def default_targets(model: nn.Module) -> list[str]:
    """LoRA target module names for this model's architecture."""
    return list(DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), FALLBACK_TARGETS))


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of targets: the module name equals a target or ends with ".target".
    return any(name == t or name.endswith("." + t) for t in targets)


# PEFT's rule for `layers_to_transform` without a `layers_pattern`: a module's layer is the
# first number that is a whole component after at least two others ("model.layers.3.mlp")
_LAYER = re.compile(r".*?\.[^.]*\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder (or encoder) layer a module belongs to, by PEFT's rule; None: no layer."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, m in model.named_modules()
             if isinstance(m, LINEAR) and _matches(n, targets)]
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, LINEAR)})
        raise ValueError(f"--lora-targets {targets} match no linear layer; this model has: "
                         f"{', '.join(found)}")
    return names


def select_layers(model: nn.Module, targets: list[str], text: str) -> list[int] | None:
    """The layers `--lora-layers text` names among those the targets sit in: N, the last N;
    or a comma list of indices and start:stop ranges (Python's: -1 is the last layer, 8: from
    8 on). Empty: None (every layer). A ValueError names what is wrong and what exists."""
    text = str(text).strip()
    if not text:
        return None
    have = sorted({i for i in map(layer_of, _targets(model, targets)) if i is not None})
    if not have:
        raise ValueError(f"--lora-layers {text}: the --lora-targets {targets} sit in no "
                         "numbered layer of this model")
    return pick_layers(text, have, "--lora-layers", f"--lora-targets {targets} module")


def pick_layers(text: str, have: list[int], flag: str, what: str, least: int = 1
                ) -> list[int]:
    """The layers of `have` (sorted indices) that `flag text` names: N, the last N (N >=
    `least`); or a comma list of indices and start:stop ranges (Python's: -1 is the last
    layer). A ValueError names what is wrong and what exists; `what` says what a layer
    must hold."""
    n = have[-1] + 1
    try:
        if text.isdigit():  # N: the last N layers
            if not least <= int(text) <= len(have):
                raise ValueError(f"asks for the last {text} of {len(have)} layers")
            return have[len(have) - int(text):]
        picked: set[int] = set()
        for part in filter(None, (p.strip() for p in text.split(","))):
            if ":" in part:
                a, b = (int(x) if x.strip() else None for x in part.split(":", 1))
                picked.update(range(n)[slice(a, b)])
            else:
                picked.add(range(n)[int(part)])
    except (ValueError, IndexError) as e:
        raise ValueError(f"{flag} {text!r}: {e}; give N (the last N layers) or indices "
                         f"and start:stop ranges of layers 0..{n - 1}, e.g. 0,{n - 1} or "
                         f"{max(0, n - 2)}:") from None
    if not picked:
        raise ValueError(f"{flag} {text!r} selects no layer")
    missing = sorted(picked - set(have))
    if missing:
        raise ValueError(f"{flag} {text!r}: layers {missing} hold no {what} "
                         f"(they sit in layers {have})")
    return sorted(picked)


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap every target Linear/Conv1D (of `spec.layers` only, if given) in a LoRALinear;
    freeze everything else. Returns names."""
    names = _targets(model, spec.targets)
    if spec.layers is not None:
        names = [n for n in names if layer_of(n) in spec.layers]
        if not names:
            raise ValueError(f"LoRA layers {spec.layers}: no --lora-targets {spec.targets} "
                             "module sits in them")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        parent, attr = _parent(model, n)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), spec.r, spec.alpha, spec.dropout))
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module, fa: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA factor, in a stable order. `fa` (LoRA-FA): the B
    factors only; A stays frozen at its (seeded) random init."""
    return [(n, p) for n, p in model.named_parameters()
            if ".lora_B" in n or (".lora_A" in n and not fa)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names."""
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        sd[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
    return sd


def save_adapter(model: nn.Module, path: str | os.PathLike, spec: LoraSpec,
                 base_model: str, metadata: dict[str, str] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (atomically) into `path`;
    `metadata` goes into the safetensors header, in the same atomic write as the weights."""
    fan_in_fan_out = any(isinstance(m.base_layer, Conv1D) for m in lora_modules(model).values())
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets), "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": spec.layers,
    }
    return adapter.write(path, lora_state_dict(model), cfg, metadata)


def read_adapter_config(path: str | os.PathLike) -> LoraSpec:
    cfg = adapter.read_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} "
                         "is not LORA")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        if cfg.get("layers_pattern"):
            raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: layers_pattern "
                             f"{cfg['layers_pattern']!r} is not supported (only PEFT's default)")
        layers = sorted([int(layers)] if isinstance(layers, int) else map(int, layers))
    return LoraSpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets,
                    layers=layers)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraSpec:
    """Inject LoRA layers as described by the adapter at `path` and load its weights."""
    spec = read_adapter_config(path)
    if not lora_modules(model):
        apply_lora(model, spec)
    load_adapter_weights(model, path)
    return spec


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy adapter_model.safetensors into the model's (already injected) LoRA layers."""
    adapter.load_into(path, {f"{PEFT_PREFIX}{n}.lora_{f}.weight": getattr(m, f"lora_{f}")
                             for n, m in lora_modules(model).items() for f in "AB"})


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base layer and unwrap it. Returns the number merged."""
    mods = lora_modules(model)
    if any(isinstance(m.base_layer, Int4Linear) or type(m.base_layer.weight)
           not in (torch.Tensor, nn.Parameter) for m in mods.values()):
        raise ValueError("merging an adapter needs the float base: load the model without "
                         "--quantize-base (the adapter trained on a quantized base loads on "
                         "either)")
    with torch.no_grad():
        for n, m in mods.items():
            base = m.base_layer
            base.weight.add_(m.delta_weight().to(base.weight.dtype))
            parent, attr = _parent(model, n)
            setattr(parent, attr, base)
    return len(mods)

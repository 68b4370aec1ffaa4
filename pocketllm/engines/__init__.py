"""Engines that run a zeroth-order step's forward passes, by name (`--engine`). One file per
engine; importing it registers it."""

from .base import REGISTRY, Engine, Seeded, register
from . import torch_engine  # noqa: F401  (registration)
from . import onnxruntime_engine, executorch_engine  # noqa: F401,E401  (runtimes load on use)

__all__ = ["REGISTRY", "Engine", "Seeded", "register"]

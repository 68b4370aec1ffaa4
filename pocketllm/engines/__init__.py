"""Engines that run a zeroth-order step's forward passes, by name (`--engine`). One file per
engine; importing it registers it."""

from .base import REGISTRY, Engine, Seeded, register
from . import torch_engine  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Engine", "Seeded", "register"]

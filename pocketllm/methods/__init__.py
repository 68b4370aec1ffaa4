"""Training methods, by name. One file per method; importing it registers it."""

from .base import (REGISTRY, Method, StepResult, build, get_method, register, setting_classes,
                   settings_for)
from . import adam, lora_adam, prge, side, zo_sgd  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Method", "StepResult", "build", "get_method", "register",
           "setting_classes", "settings_for"]

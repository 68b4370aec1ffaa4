"""How a zeroth-order step draws z for each trainable tensor, by name (`--zo-perturbation`).
One file per perturbation; importing it registers it."""

from .base import REGISTRY, Key, Perturbation, build, register, spec_from_args
from . import dense  # noqa: F401  (registration)
from . import sparse  # noqa: F401  (registration)
from . import lowrank  # noqa: F401  (registration)
from . import hizoo  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Key", "Perturbation", "build", "register", "spec_from_args"]

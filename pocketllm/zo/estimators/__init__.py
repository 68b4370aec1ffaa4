"""Zeroth-order gradient estimators, by name (`--estimator`). One file per estimator; importing
it registers it."""

from .base import REGISTRY, Estimator, build, register
from . import spsa  # noqa: F401  (registration)
from . import fzoo  # noqa: F401  (registration)
from . import svrg  # noqa: F401  (registration)
from . import hizoo  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Estimator", "build", "register"]

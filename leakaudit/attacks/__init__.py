"""Privacy attacks on language models: one registry of membership-inference attacks, plus user inference.

`get_attack(name, **config)` builds an attack with validated options; `ATTACKS` maps names to classes.
"""

from leakaudit.attacks import lira as _lira  # noqa: F401
from leakaudit.attacks import mia as _mia  # noqa: F401  (registers the attacks)
from leakaudit.attacks import neighbourhood as _neighbourhood  # noqa: F401
from leakaudit.attacks.base import ATTACKS, Attack, AttackConfig, ScoringContext, get_attack

__all__ = ["ATTACKS", "Attack", "AttackConfig", "ScoringContext", "get_attack"]

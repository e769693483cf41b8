"""Evaluation and generation kinds: one file per kind, each registering itself (see base.py for the contract,
docs/architecture.md for where kinds sit in the flow). Importing this package fills the registry."""

from leakaudit.kinds import (  # noqa: F401  (built-in kinds register on import)
    backdoor,
    backdoor_mix,
    continuation,
    mia,
    perplexity,
    pii,
    pii_logprob,
    replace_pii,
    self_instruct,
    user_inference,
)
from leakaudit.kinds.registry import get_kind, kind_names, register, unknown_kind_message

__all__ = ["get_kind", "kind_names", "register", "unknown_kind_message"]

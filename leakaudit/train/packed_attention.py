"""Attention for packed training rows on a CPU: each example of a row attends to itself alone, computed example
by example instead of as one row-long attention under a block-diagonal mask.

Why: a packed row (examples concatenated, position ids restarting per example) makes transformers build a
block-diagonal causal mask, and sdpa then computes every one of the row's L x L scores, of which the mask keeps
about 1/n for n examples, forward and backward. On a 2-core AMD EPYC the demo's exposure fine-tune (8 messages
in one row of 701 tokens, default model) ran forward + backward 1.19x faster in fp32 and 1.28x with bf16
autocast (BENCHMARKS.md, "Fine-tuning"). Each example's attention is the computation the mask asked for: the
fp32 loss is the same to the last digit printed.

Training only (`packed_attention`, around the Trainer's run on packed batches), on CPUs only (on GPUs sdpa's
kernels are as measured there). A row is split where its position ids do not go up by one, the rule
transformers' own packed-sequence mask follows, and only when the mask transformers built is exactly that
block-diagonal causal mask. Without position ids, without such a mask (a padding mask beside them), or with
anything this does not handle the way sdpa does (sliding windows, soft-capping, attention sinks, a position
bias, a non-causal module, a key/value cache), the call goes to transformers' sdpa function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from leakaudit.models.dtype import sdpa_replaced

NAME = "leakaudit_packed"
# Per mask tensor of one forward: the rows' example bounds, or None (not plain packing).
# Keyed weakly by identity: an entry goes with its tensor, so a new forward never meets an old plan.
_PLANS = WeakIdKeyDictionary()
_UNHANDLED = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


def per_example_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (b, heads, L, d), key/value (b, kv_heads, L, d), position ids
    (b, L); returns (b, L, heads, d_v)."""
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    segments = None
    if (position_ids is not None and attention_mask is not None and causal
            and position_ids.shape == (query.shape[0], query.shape[2]) and key.shape[2] == query.shape[2]
            and all(kwargs.get(k) is None for k in _UNHANDLED)):
        segments = _segments(attention_mask, position_ids)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_ids=position_ids, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for r, bounds in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
                                                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
                 for a, b in bounds]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _segments(mask: torch.Tensor, position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each example, a new one wherever the position does not go up by one; None
    unless the mask hides exactly the other examples and later tokens (not, say, padding beside the packing).
    Worked out once per forward (every layer gets the same mask tensor) and kept while it lives."""
    if mask in _PLANS:
        return _PLANS[mask]
    new = torch.ones_like(position_ids, dtype=torch.bool)
    new[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    plan = None
    if _block_diagonal_causal(mask, new.cumsum(1)):
        length = position_ids.shape[1]
        plan = []
        for row in new.cpu():
            first = row.nonzero().flatten().tolist()
            plan.append(list(zip(first, first[1:] + [length], strict=True)))
    _PLANS[mask] = plan
    return plan


def _block_diagonal_causal(mask: torch.Tensor, example: torch.Tensor) -> bool:
    """True when the boolean mask (b, 1, L, L) lets each token see exactly the earlier tokens of its example."""
    length = example.shape[1]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (length, length):
        return False
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    example = example.to(mask.device)
    return bool((mask[:, 0] == ((example[:, :, None] == example[:, None, :]) & causal)).all())


AttentionInterface.register(NAME, per_example_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks sdpa gets (checked, then not used)


def packed_attention(model: torch.nn.Module, device: torch.device):
    """A context: within it a model on a CPU whose attention is sdpa runs `per_example_attention`; any other
    model or device is untouched. Restored afterwards."""
    return sdpa_replaced(model, NAME, when=device.type == "cpu")

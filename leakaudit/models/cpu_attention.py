"""Attention for scoring on a CPU in bf16: causal query blocks on plain bf16 matmuls instead of torch's CPU
flash kernel.

Why: on a 2-core AMD EPYC with AVX512-BF16, torch's CPU flash-attention kernel ran the scoring engine's shapes
(9 heads of 64, rows of 128-400 tokens) at 30-70 GFLOP/s in bf16, a tenth of the bf16 matmul peak, and took a
third of a scoring pass for 5% of its FLOPs. Here each block of BLOCK query rows is one bf16 matmul against
only the keys causality lets it see (so about half of the L x L scores are never computed), a softmax that
reads bf16 and reduces in fp32, and one matmul with the values; grouped-query heads share their key/value head
without copying it. Queries are scaled before the scores, and each block masks only from the first key one of
its queries may not see (without left padding, its diagonal tile), worked out once per forward's mask: on
4k-token texts masking and scaling the L x L scores had taken 15% of a pass. On the same CPU that is 1.6-2.8x
the flash kernel on those shapes with one thread and 2.1-2.8x with two (BENCHMARKS.md). Precision: scores are
rounded to bf16 before the softmax (the flash kernel keeps them in fp32), which doubles the attention output's
own error against fp32 on random inputs; through the whole model the per-token log p of the default model
stays as far from fp32 as with the flash kernel (mean |difference| 0.0189 against 0.0186 nats, 40 texts).

Scoring only (`scoring_attention`): training and sampling keep the model's own implementation. Anything this
does not handle the way sdpa does (a float mask such as ALiBi's, soft-capping, attention sinks, a position
bias, dropout) goes to transformers' sdpa function unchanged.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from leakaudit.models.dtype import sdpa_replaced

NAME = "leakaudit_cpu_blocks"
BLOCK = 64  # query rows per block: 64 and 96 measured alike and ahead of 128 and 192 (BENCHMARKS.md)
_UNHANDLED = ("softcap", "s_aux", "sinks", "position_bias")
# Per mask tensor (transformers passes every layer of one forward the same object): its negation and where
# each query block's masking starts. Keyed weakly by identity: an entry goes with its mask, so a new mask
# never meets an old plan.
_PLANS = WeakIdKeyDictionary()


def blocked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (b, heads, lq, d), key/value (b, kv_heads, lk, d), the boolean
    mask sdpa would get (True = may attend) or None for plain causal attention; returns (b, lq, heads, d_v).
    The queries are the last lq positions of the keys (a cache's keys come first)."""
    if (dropout or (attention_mask is not None and attention_mask.dtype != torch.bool)
            or any(kwargs.get(k) is not None for k in _UNHANDLED)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, lq, d = query.shape
    kv_heads, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = heads // kv_heads
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    scaling = d ** -0.5 if scaling is None else scaling
    blocks = _mask_plan(attention_mask, lq, lk, causal, query.device)
    # scaled before the scores: lq x d multiplies instead of lq x lk (exact for d = 64, a power of two)
    q = (query * scaling).view(b, kv_heads, group, lq, d)
    keys_t = key.transpose(-1, -2)
    out = query.new_empty(b, lq, kv_heads, group, dv)
    for first, last, seen, start, hidden in blocks:
        rows = last - first
        # (b, kv, group x rows, d) @ (b, kv, d, seen): one matmul per key/value head for its whole group
        scores = torch.matmul(q[:, :, :, first:last].reshape(b, kv_heads, group * rows, d), keys_t[..., :seen])
        scores = scores.view(b, kv_heads, group, rows, seen)
        if start < seen:  # keys before `start` are visible to every query of the block: nothing to mask
            # finite: a row with every key hidden (left padding) stays finite; in the scores' dtype (autocast)
            scores[..., start:].masked_fill_(hidden, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).view(b, kv_heads, group * rows, seen)
        out[:, first:last] = (torch.matmul(probs, value[:, :, :seen]).view(b, kv_heads, group, rows, dv)
                              .permute(0, 3, 1, 2, 4))
    return out.view(b, lq, heads, dv), None


def _mask_plan(mask: torch.Tensor | None, lq: int, lk: int, causal: bool, device: torch.device):
    """Per query block: first row, end row, keys it may see, first key column to mask, and the hidden part
    of the mask from that column on, broadcastable to (b, kv, group, rows, cols). Masking only from the first
    column any query of the block may not see spares the L x L masked_fill: with no padding on the left, only
    the block's diagonal tile. Worked out once per mask object and reused by every layer."""
    # _version counts in-place changes (inference tensors keep none; the engine's masks are made per forward)
    key = (lq, lk, causal, BLOCK, 0 if mask is None or mask.is_inference() else mask._version)
    if mask is not None and key in _PLANS.get(mask, {}):
        return _PLANS[mask][key]
    blocks = []
    if mask is None:
        tile = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=device).triu(1)  # key after query: hidden
    not_mask = None if mask is None else ~mask[:, :, None]  # (b or 1, 1, 1, lq, lk)
    for first in range(0, lq, BLOCK):
        last = min(lq, first + BLOCK)
        rows = last - first
        seen = min(lk, last + lk - lq) if causal else lk  # keys the block's last query may see
        if not_mask is None:
            start = seen - rows if causal else seen
            hidden = tile[:rows, :rows] if causal else None
        else:
            block = not_mask[..., first:last, :seen]
            cols = block.flatten(0, -2).any(dim=0)
            start = int(cols.int().argmax()) if bool(cols.any()) else seen
            hidden = block[..., start:]
        blocks.append((first, last, seen, start, hidden))
    if mask is not None:
        _PLANS.setdefault(mask, {})[key] = blocks
    return blocks


AttentionInterface.register(NAME, blocked_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks sdpa gets


def scoring_attention(model: torch.nn.Module, device: torch.device):
    """A context: within it a bf16 model on a CPU whose attention is sdpa runs `blocked_attention`; any other
    model, dtype or device is untouched. Restored afterwards."""
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    return sdpa_replaced(model, NAME, when=device.type == "cpu" and bf16)

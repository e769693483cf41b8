"""Perplexity of a model on texts, and of every checkpoint of a fine-tuning run.

Definitions (over the tokens score_texts scores; the first token of a text has no context):
  corpus ppl  = exp(total NLL / total scored tokens)      (`ppl`; the standard token-weighted number)
  mean ppl    = mean over texts of exp(mean NLL of text)  (`mean_text_ppl`; weights each text equally)
Lower ppl = the model fits the texts better (for members, a lower ppl hints at memorisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakaudit.distributed import score_texts_distributed
from leakaudit.errors import InputError
from leakaudit.models import LoadedModel


@dataclass
class ModelPerplexity:
    """Perplexity of one model on a set of texts."""

    model: str
    ppl: float
    mean_text_ppl: float
    nll_per_token: float
    n_texts: int
    n_tokens: int


def perplexity(lm: LoadedModel, texts: Sequence[str], *, batch_size: int | str = "auto",
               max_length: int | None = None, stride: int | None = None, progress: bool = True,
               cache: bool = True) -> ModelPerplexity:
    """Corpus and mean per-text perplexity from one batched scoring pass (served from the score cache unless
    `cache=False`); data-parallel under a launcher (each process scores a shard, every process gets all)."""
    from leakaudit.errors import check_texts

    texts = check_texts(texts)  # one string was read as its characters: "no text has a token to score"
    scores = [s for s in score_texts_distributed(lm, texts, batch_size=batch_size, max_length=max_length,
                                                 stride=stride, progress=progress, description="perplexity",
                                                 cache=cache)
              if s.n_tokens]
    if not scores:
        raise InputError("no text has a token to score (texts need at least 2 tokens)", field="--data")
    if len(scores) < len(texts):  # n_texts said fewer than were given, and nothing said why
        from leakaudit.warn import warn_once

        warn_once(f"{len(texts) - len(scores)} of {len(texts)} texts have no scored token (fewer than 2 tokens "
                  "and no BOS) and are left out of the perplexity (n_texts counts the others)")
    total_nll = -sum(s.sum_logp for s in scores)
    n_tokens = sum(s.n_tokens for s in scores)
    per_text = [math.exp(-s.mean_logp) for s in scores]
    return ModelPerplexity(model=lm.spec, ppl=math.exp(total_nll / n_tokens),
                           mean_text_ppl=float(np.mean(per_text)), nll_per_token=total_nll / n_tokens,
                           n_texts=len(scores), n_tokens=n_tokens)


def model_dirs(run_dir: str | Path) -> list[Path]:
    """Every loadable model in a fine-tuning run dir: each checkpoint (in step order), then the final one."""
    from leakaudit.train.artifacts import checkpoint_dirs

    run = Path(run_dir)
    found = []
    for ckpt in checkpoint_dirs(run):
        loadable = ckpt / "adapter" if (ckpt / "adapter" / "adapter_config.json").exists() else ckpt
        if (loadable / "config.json").exists() or (loadable / "adapter_config.json").exists():
            found.append(loadable)
    if (run / "config.json").exists() or (run / "adapter_config.json").exists():
        found.append(run)
    return found


def perplexity_per_checkpoint(run_dir: str | Path, texts: Sequence[str], *, device: str | None = None,
                              dtype: str | None = None, batch_size: int | str = "auto",
                              max_length: int | None = None, stride: int | None = None,
                              progress: bool = True) -> list[ModelPerplexity]:
    """Perplexity of every checkpoint and the final model of a run (one model in memory at a time)."""
    from leakaudit.errors import check_texts
    from leakaudit.models import load_model

    texts = check_texts(texts)  # a generator was read up by the first checkpoint, and the next had no texts
    dirs = model_dirs(run_dir)
    if not dirs:
        raise InputError("no model or checkpoint found in this dir", file=run_dir, field="--model")
    results = []
    for d in dirs:
        lm = load_model(str(d), device=device, dtype=dtype)
        results.append(perplexity(lm, texts, batch_size=batch_size, max_length=max_length, stride=stride,
                                  progress=progress))
        del lm
    return results

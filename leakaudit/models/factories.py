"""Models built from code rather than files: the seeded tiny test models and `random:NAME` paper-scale shapes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leakaudit.errors import InputError
from leakaudit.models.fingerprint import build_once

TINY_SPECS = ("tiny-gpt-neox", "tiny-opt")
RANDOM_PREFIX = "random:"
# Shapes of the studies' models, from their public config.json files (hidden, layers, heads, ffn).
RANDOM_SHAPES = {
    "pythia-160m": ("gpt_neox", 768, 12, 12, 3072),
    "pythia-410m": ("gpt_neox", 1024, 24, 16, 4096),
    "pythia-1.4b": ("gpt_neox", 2048, 24, 16, 8192),
    "pythia-2.8b": ("gpt_neox", 2560, 32, 32, 10240),
    "pythia-6.9b": ("gpt_neox", 4096, 32, 32, 16384),
    "opt-125m": ("opt", 768, 12, 12, 3072),
    "opt-1.3b": ("opt", 2048, 24, 32, 8192),
    "opt-2.7b": ("opt", 2560, 32, 32, 10240),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384),
}



TINY_VOCAB = 1024


def tiny_corpus() -> list[str]:
    """Shipped text the tiny tokenizer is trained on: seed tasks, names and e-mail addresses."""
    from leakaudit import resources

    lines: list[str] = []
    with resources.path("self-instruct-seed", "seed_tasks.jsonl").open(encoding="utf-8") as fh:
        for raw in fh:
            task = json.loads(raw)
            lines.append(task["instruction"])
            for inst in task["instances"]:
                lines.append(inst["input"])
                lines.append(inst["output"])
    with resources.path("pii-enron-pil", "name2email.jsonl").open(encoding="utf-8") as fh:
        for raw in fh:
            row = json.loads(raw)
            lines.append(f"{row['name']} <{row['email']}>")
    return [x for x in lines if x]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on shipped text; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(arch: str, seed: int = 0):
    """A small random model of the given architecture (Pythia = GPT-NeoX, or OPT), seeded."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "tiny-gpt-neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=256, rotary_pct=0.25,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "tiny-opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=256, max_position_embeddings=256, word_embed_proj_dim=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = OPTForCausalLM(cfg)
    else:  # pragma: no cover - guarded by caller
        raise ValueError(arch)
    return model, tokenizer


def tiny_model_dir(arch: str) -> Path:
    """Materialise a tiny test model as a normal safetensors model dir in the cache."""

    def build(tmp: Path) -> None:
        model, tokenizer = build_tiny_model(arch)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return build_once(f"{arch}-v1", build)


def random_model_config(name: str):
    """The config of a `random:NAME` spec (vocab of the real model, 2048 positions)."""
    from transformers import GPTNeoXConfig, OPTConfig

    if name not in RANDOM_SHAPES:
        raise InputError(f"unknown random architecture '{name}'; known: {', '.join(RANDOM_SHAPES)}",
                         field="--model")
    arch, hidden, layers, heads, ffn = RANDOM_SHAPES[name]
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=2048,
                             rotary_pct=0.25, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)

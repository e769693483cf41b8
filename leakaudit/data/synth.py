"""Make synthetic ("generated") data from a generator model: continuations of source texts, and
self-instruct instruction data grown from seed tasks.

Continuation (the study's generated data): each prompt is the first N tokens of a source text (or a
field of the row); the generator continues it (study defaults: top-k 100, up to 1000 new tokens).
Each output row holds `text` = prompt + continuation (a document ready to train on), `generated` = the
continuation alone, and provenance: source id, generator spec and fingerprint, sampling options.

Self-instruct (Wang et al. 2023): keep a pool of instructions (the seed tasks first). Each round
builds prompts from 8 in-context instructions (6 from the seeds, 2 from generated ones when there are
any), asks the model for the next numbered instructions, keeps a candidate only if it passes simple
quality filters and its ROUGE-L F1 against every instruction in the pool is at most 0.7, then
generates an input/output instance for each kept instruction; until `n` new tasks are kept.

Both resume after a kill: continuation through the sampling engine's checkpoint file, self-instruct
by appending each round's accepted tasks to the output and replaying them into the pool on rerun.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leakaudit.data.io import Record, json_line, open_append, read_rows, write_jsonl
from leakaudit.errors import InputError
from leakaudit.models import LoadedModel
from leakaudit.sampling import SamplingConfig, resolve_backend, sample, sampled_with

CONTINUATION_DEFAULTS = SamplingConfig(max_new_tokens=1000, top_k=100, temperature=1.0)
DEFAULT_PROMPT_TOKENS = 50
ROUGE_THRESHOLD = 0.7


# ----------------------------------------------------------------------------------------- continuation
def continuation_prompts(lm: LoadedModel, records: Sequence[Record], *, prompt_tokens: int | None = None,
                         prompt_field: str | None = None, source: str | Path | None = None,
                         text_field: str = "text") -> list[str]:
    """The prompt of each record: the first `prompt_tokens` tokens of its text, or the value of a field (the
    text field itself too: the whole text is the prompt; it was said to be missing, kept apart from `extra`)."""
    if prompt_field is not None:
        out = []
        for r in records:
            value = r.text if prompt_field == text_field else r.extra.get(prompt_field)
            if not isinstance(value, str) or not value.strip():
                raise InputError("missing or not a non-empty string", file=source, line=r.line, field=prompt_field)
            out.append(value)
        return out
    n = DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens
    if n < 1:
        raise InputError("must be at least 1", field="--prompt-tokens")
    ids = lm.tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]
    return [_prefix_prompt(lm.tokenizer, r.text, x, n) for r, x in zip(records, ids, strict=True)]


def _prefix_prompt(tokenizer, text: str, ids: list[int], n: int) -> str:
    """The first n tokens decoded, one token shorter while the cut splits a character: byte-level tokens can
    end inside one, which decodes to U+FFFD, a prompt that is not the start of the record. When even the
    first token splits the first character (an emoji, a CJK character), the prompt runs to that character's
    end instead."""
    def split(prompt: str) -> bool:
        return prompt.endswith("\ufffd") and not text.startswith(prompt)

    k = min(n, len(ids))
    prompt = tokenizer.decode(ids[:k], skip_special_tokens=True)
    while k > 1 and split(prompt):
        k -= 1
        prompt = tokenizer.decode(ids[:k], skip_special_tokens=True)
    while k < len(ids) and split(prompt):
        k += 1
        prompt = tokenizer.decode(ids[:k], skip_special_tokens=True)
    return prompt


def generate_continuations(lm: LoadedModel, records: Sequence[Record], out: str | Path,
                           config: SamplingConfig = CONTINUATION_DEFAULTS, *, prompt_tokens: int | None = None,
                           prompt_field: str | None = None, batch_size: int | str = "auto",
                           progress: bool = True, backend: str = "hf", source: str | Path | None = None,
                           text_field: str = "text") -> list[dict[str, Any]]:
    """Continue every record's prompt `config.num_samples` times and write the data file `out` (JSONL).

    Samples are checkpointed next to `out` (`<out>.partial`) and the final file is written atomically.
    """
    out = Path(out)
    prompts = continuation_prompts(lm, records, prompt_tokens=prompt_tokens, prompt_field=prompt_field,
                                   source=source, text_field=text_field)
    partial = out.with_name(out.name + ".partial")
    samples = sample(lm, prompts, config, prompt_ids=[r.id for r in records], out_path=partial,
                     batch_size=batch_size, progress=progress, backend=backend)
    provenance = {"generator": lm.spec, "generator_fingerprint": lm.current_fingerprint(), "sampling": asdict(config),
                  "prompt": {"field": prompt_field} if prompt_field else
                  {"first_tokens": prompt_tokens or DEFAULT_PROMPT_TOKENS},
                  # which backend sampled (`auto` picks one) and in which dtype: rows differ with either
                  **sampled_with(lm, resolve_backend(lm, backend, config))}
    rows = [{"id": f"{s.prompt_id}#{s.sample_index}", "source_id": s.prompt_id, "sample_index": s.sample_index,
             "prompt": s.prompt, "generated": s.text, "text": s.prompt + s.text, "n_new_tokens": s.n_new_tokens,
             "provenance": provenance} for s in samples]
    write_jsonl(out, rows)
    partial.unlink(missing_ok=True)
    return rows


# ----------------------------------------------------------------------------------------- seed tasks
@dataclass
class Task:
    """One instruction task with its instances (each {"input", "output"})."""

    instruction: str
    instances: list[dict[str, str]]
    id: str = ""


def load_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks in the self-instruct layout ({"instruction", "instances": [...]}) or with "examples"."""
    p = Path(path)
    tasks = []
    for lineno, row in read_rows(p):
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError("missing or empty", file=p, line=lineno, field="instruction")
        key = "instances" if "instances" in row else "examples"
        instances = row.get(key, [])
        if not isinstance(instances, list) or not all(
                isinstance(x, dict) and isinstance(x.get("input", ""), str) and isinstance(x.get("output"), str)
                for x in instances):
            raise InputError("must be a list of {\"input\": str, \"output\": str}", file=p, line=lineno, field=key)
        tasks.append(Task(instruction.strip(), [{"input": x.get("input", ""), "output": x["output"]}
                                                for x in instances], str(row.get("id", f"seed:{lineno}"))))
    return tasks


# ----------------------------------------------------------------------------------------- filters
class _WordTokenizer:
    """rouge-score's tokenizer for every script: lower case, split on what is not a letter or digit. Its own
    keeps only [a-z0-9], so two instructions in Chinese or Russian had no tokens and a ROUGE-L of 0: never
    duplicates. On ASCII text the tokens are the same as its own."""

    def tokenize(self, text: str) -> list[str]:
        return re.sub(r"[\W_]+", " ", text.lower()).split()


class RougeFilter:
    """Rejects instructions too similar to any in the pool: ROUGE-L F1 > threshold (the paper's 0.7)."""

    def __init__(self, pool: Sequence[str] = (), threshold: float = ROUGE_THRESHOLD):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_WordTokenizer())
        self.threshold = threshold
        self.pool: list[str] = list(pool)

    def max_similarity(self, candidate: str) -> float:
        return max((self.scorer.score(p, candidate)["rougeL"].fmeasure for p in self.pool), default=0.0)

    def accept(self, candidate: str) -> bool:
        """True (and the candidate joins the pool) when it is novel enough."""
        if self.max_similarity(candidate) > self.threshold:
            return False
        self.pool.append(candidate)
        return True


BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


def passes_quality(instruction: str) -> bool:
    """The paper's heuristics: 3..150 words, nothing a text model cannot do, not "write a program", starts
    with an ASCII letter or digit."""
    words = instruction.split()
    if not 3 <= len(words) <= 150:
        return False
    low = instruction.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in BLOCKED_WORDS):
        return False
    if low.startswith("write a program"):
        return False
    return instruction[0].isascii() and instruction[0].isalnum()


# ----------------------------------------------------------------------------------------- self-instruct
def instruction_prompt(examples: Sequence[str]) -> str:
    """Ask for the next instruction after a numbered list of in-context ones."""
    lines = ["Come up with a series of tasks:", ""]
    lines += [f"{i}. {e}" for i, e in enumerate(examples, start=1)]
    lines.append(f"{len(examples) + 1}.")
    return "\n".join(lines)


def parse_instructions(generated: str) -> list[str]:
    """Split a continuation "Xyz?\\n10. Abc\\n11. ..." into instructions (the first is the prompt's number)."""
    parts = re.split(r"\n\s*\d+\s*\.\s*", "\n" + generated.lstrip(" "))
    out = []
    for part in parts:
        text = " ".join(part.split())
        if text:
            out.append(text)
    return out


def instance_prompt(demos: Sequence[Task], instruction: str) -> str:
    """Few-shot prompt asking for an input and output of a new instruction."""
    blocks = []
    for t in demos:
        inst = t.instances[0] if t.instances else {"input": "", "output": ""}
        blocks.append(f"Instruction: {t.instruction}\nInput: {inst['input'] or '<noinput>'}\nOutput: {inst['output']}")
    blocks.append(f"Instruction: {instruction}\nInput:")
    return "\n\n".join(blocks)


def parse_instance(generated: str) -> dict[str, str] | None:
    """"<input>\\nOutput: <output>" -> {"input", "output"}; None when there is no non-empty output."""
    body = re.split(r"\n\s*\n\s*Instruction:", generated)[0]
    if "Output:" not in body:
        return None
    inp, _, outp = body.partition("Output:")
    inp, outp = inp.strip(), outp.strip()
    if inp == "<noinput>":
        inp = ""
    return {"input": inp, "output": outp} if outp else None


def _round_rng(seed: int, round_index: int) -> random.Random:
    digest = hashlib.sha256(f"self-instruct\x1f{seed}\x1f{round_index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def self_instruct(lm: LoadedModel, seeds: Sequence[Task], out: str | Path, n: int, *, requests_per_round: int = 8,
                  max_rounds: int | None = None, max_new_tokens: int = 128, temperature: float = 0.7,
                  top_p: float = 0.5, seed: int = 0, batch_size: int | str = "auto", progress: bool = True,
                  on_round: Callable[[int, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Grow `n` new tasks from `seeds`, appending each round's accepted tasks to `out` (JSONL; resumable).

    Decoding defaults follow the paper (temperature 0.7, top-p 0.5). Stops after `max_rounds`
    (default 20 * ceil(n / requests_per_round)) even when short of `n`, so a weak generator cannot
    loop forever; the rows say how many were kept. `on_round(round, kept_now, total)` reports progress.
    """
    if n < 1:
        raise InputError("must be at least 1", field="--n")
    if len(seeds) < 1:
        raise InputError("no seed tasks", field="--seed-tasks")
    out = Path(out)
    seeds_digest = hashlib.sha256(json.dumps([[t.instruction, t.instances] for t in seeds]).encode()).hexdigest()
    provenance = {"generator": lm.spec, "generator_fingerprint": lm.current_fingerprint(), "method": "self-instruct",
                  "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                  "rouge_l_threshold": ROUGE_THRESHOLD, "requests_per_round": requests_per_round,
                  "seed_tasks_sha256": seeds_digest[:16],
                  **sampled_with(lm, "hf")}  # a file begun in fp32 was resumed in bf16 with no word, its rounds mixed
    done = _read_generated_tasks(out, provenance, n)
    rouge = RougeFilter([t.instruction for t in seeds] + [r["instruction"] for r in done])
    generated = list(done)
    next_round = max((r["round"] for r in done), default=-1) + 1
    rounds = max_rounds if max_rounds is not None else 20 * -(-n // requests_per_round)
    out.parent.mkdir(parents=True, exist_ok=True)
    for round_index in range(next_round, rounds):
        if len(generated) >= n:
            break
        rng = _round_rng(seed, round_index)
        prompts = []
        for _ in range(requests_per_round):
            k_machine = min(2, len(generated))
            examples = rng.sample([t.instruction for t in seeds], min(8 - k_machine, len(seeds)))
            examples += rng.sample([g["instruction"] for g in generated], k_machine)
            rng.shuffle(examples)
            prompts.append(instruction_prompt(examples))
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed * 1_000_003 + round_index)
        candidates: list[str] = []
        for s in sample(lm, prompts, cfg, batch_size=batch_size, progress=False):
            candidates += parse_instructions(s.text)
        accepted = [c for c in dict.fromkeys(candidates) if passes_quality(c) and rouge.accept(c)]
        kept = accepted[:n - len(generated)]
        rows = []
        if kept:
            demos = [rng.sample(list(seeds), min(3, len(seeds))) for _ in kept]
            inst_prompts = [instance_prompt(d, c) for d, c in zip(demos, kept, strict=True)]
            inst_cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed * 1_000_003 + round_index)
            for c, s in zip(kept, sample(lm, inst_prompts, inst_cfg, batch_size=batch_size, progress=False),
                            strict=True):
                inst = parse_instance(s.text)
                rows.append({"id": f"self-instruct:{len(generated) + len(rows)}", "instruction": c,
                             "instances": [inst] if inst else [], "round": round_index,
                             "round_rows": len(kept), "provenance": provenance,
                             # the round accepted more than `n` left room for: a larger `n` redoes it whole
                             **({"round_accepted": len(accepted)} if len(accepted) > len(kept) else {})})
        if rows:
            with open_append(out) as fh:
                fh.write("".join(json_line(r) for r in rows))
        generated += rows
        if on_round is not None:
            on_round(round_index, len(rows), len(generated))
    return generated


#: provenance keys a self-instruct file of an earlier release lacks (`sampling.sampled_with`'s)
LATER_KEYS = ("backend", "dtype", "device", "vllm")


def _read_generated_tasks(path: Path, provenance: dict[str, Any], n: int | None = None) -> list[dict[str, Any]]:
    """Tasks already written by an earlier (killed) run of the same options. A round is kept whole or not at
    all: a kill can cut its write short (a half line, or lines missing), and the rerun redoes that round, so
    the file ends as a straight run's would. So is a last round that an earlier, smaller `n` cut short
    (`round_accepted`) when `n` now asks for more: a straight run of this `n` kept the rest of it too. Tasks
    from other options are refused, never mixed in."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, ends = [], []
    # split on b"\n" only: the rows are written with ensure_ascii=False, and str.splitlines would also break
    # them at a U+2028 inside a generated string
    for lineno, line in enumerate(raw[:raw.rfind(b"\n") + 1].split(b"\n")[:-1], start=1):
        ends.append((ends[-1] if ends else 0) + len(line) + 1)
        if not line.strip():
            rows.append(None)
            continue
        try:
            row = json.loads(line)
            if not isinstance(row.get("instruction"), str) or not isinstance(row.get("round"), int):
                raise ValueError("needs 'instruction' and 'round'")
        except (json.JSONDecodeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a self-instruct row from this tool ({exc}); use a new output file",
                             file=path, line=lineno) from None
        theirs = {k: v for k, v in (row.get("provenance") or {}).items() if k != "generator"}
        # a file of a release that did not yet write what sampled it (dtype, backend) is taken as this run's
        ours = {k: v for k, v in provenance.items() if k != "generator" and (k in theirs or k not in LATER_KEYS)}
        if theirs != ours:
            changed = sorted(k for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
            raise InputError(f"holds tasks generated with other options ({', '.join(changed)}); use a new "
                             "--out, or delete it to start over", file=path, line=lineno, field="--out")
        rows.append(row)
    # the first round with fewer rows than it wrote (the last one, cut by a kill; or one edited by hand) and
    # everything after it, which was generated with it in view, are redone
    counts = Counter(r["round"] for r in rows if r is not None)
    keep = next((i for i, r in enumerate(rows)
                 if r is not None and counts[r["round"]] < r.get("round_rows", 0)), len(rows))
    kept = [r for r in rows[:keep] if r is not None]
    if n is not None and kept and len(kept) < n and kept[-1].get("round_accepted", 0) > kept[-1].get("round_rows", 0):
        last = kept[-1]["round"]  # cut by the smaller n: redone whole, as a straight run of this n wrote it
        keep = next(i for i, r in enumerate(rows) if r is not None and r["round"] == last)
    good_end = ends[keep - 1] if keep else 0
    if good_end < len(raw):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return [r for r in rows[:keep] if r is not None]


def instruction_rows(tasks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten tasks into one row per instance for fine-tuning: {id, instruction, input, output, text,
    source_task}, `text` being the three parts joined by newlines (the empty ones left out)."""
    return [{"id": f"{t['id']}#{j}", "instruction": t["instruction"], "input": inst["input"],
             "output": inst["output"],
             "text": "\n".join(x for x in (t["instruction"], inst["input"], inst["output"]) if x),
             "source_task": t["id"]}
            for t in tasks for j, inst in enumerate(t["instances"])]

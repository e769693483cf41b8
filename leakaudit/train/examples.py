"""Turn data rows into training examples (token ids + labels) and batch them without wasted compute.

Formats (labels of -100 carry no loss; padding never carries loss):
- `plain`: the text plus EOS; loss on every token. Texts longer than max_length are split into chunks.
- `instruction`: the documented template below; loss on the response (and its EOS) only:
      ### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<eos>
- `chat`: rows with `messages` [{role, content}], rendered with the tokenizer's chat template when it has
  one, else the plain template `<|role|>\\n{content}\\n` per turn with EOS after each assistant turn.
  `loss_on="assistant"` puts loss on the assistant turns' content and end marker only (their header is
  the generation prompt, so it is masked like the user turns);
  `"all"` on every token.

Batching: `packed` concatenates a batch into one row (several rows where one would outgrow the model's
context) with per-example position ids, which (with no attention mask) gives a block-diagonal causal mask,
so the loss equals the unpacked loss while (almost) no compute goes to padding. `padded` pads right to the batch's longest example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from leakaudit.models.tokens import encode

INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
PLAIN_CHAT_TURN = "<|{role}|>\n{content}\n"
IGNORE = -100


@dataclass
class Example:
    """One training sequence; `labels[i] == -100` means no loss on token i."""

    input_ids: list[int]
    labels: list[int]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def plain_examples(tokenizer, texts: list[str], max_length: int) -> list[Example]:
    """Text + EOS, split into chunks of at most max_length tokens; loss on all tokens."""
    out: list[Example] = []
    if not texts:
        return out
    for ids in encode(tokenizer, texts):
        ids = ids + _eos(tokenizer)
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length]
            if len(chunk) >= 2:
                out.append(Example(chunk, list(chunk)))
    return out


def _segment_ids(tokenizer, segments: list[tuple[str | list[int], bool]], first_special: bool) -> list[list[int]]:
    """Each (text, trainable) segment's ids, tokenised one by one so label boundaries are exact."""
    return [(encode(tokenizer, [seg], special=first_special and i == 0)[0] if seg else []) if isinstance(seg, str)
            else list(seg) for i, (seg, _) in enumerate(segments)]


def _from_segments(tokenizer, segments: list[tuple[str | list[int], bool]], max_length: int,
                   first_special: bool) -> Example:
    """The segments' ids with loss on the trainable ones; truncated to max_length."""
    ids: list[int] = []
    labels: list[int] = []
    for seg_ids, (_, trainable) in zip(_segment_ids(tokenizer, segments, first_special), segments, strict=True):
        ids.extend(seg_ids)
        labels.extend(seg_ids if trainable else [IGNORE] * len(seg_ids))
    return Example(ids[:max_length], labels[:max_length])


def instruction_example(tokenizer, prompt: str, response: str, max_length: int) -> Example:
    """The instruction template with loss on the response and EOS only."""
    return _from_segments(tokenizer, [(INSTRUCTION_TEMPLATE.format(prompt=prompt), False), (response, True),
                                      (_eos(tokenizer), True)], max_length, first_special=True)


#: a turn's stand-in content, to find where a template puts a turn's text
TURN_PROBE = "\u2063leakaudit-turn\u2063"


def chat_segments(tokenizer, messages: list[dict[str, str]], loss_on: str) -> list[tuple[str | list[int], bool]]:
    """Split a rendered conversation into (text, trainable) pieces at turn boundaries."""
    if getattr(tokenizer, "chat_template", None):
        def render(msgs, gen=False):
            """The template's text of `msgs`; a template that refuses a conversation (Gemma's "System role not
            supported") is a ValueError, said in one line."""
            if not msgs:
                return ""
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            except jinja2.TemplateError as exc:
                raise ValueError(f"the tokenizer's chat template refused this conversation: {exc}") from None

        full = render(messages)
        segments: list[tuple[str | list[int], bool]] = []
        pos = 0
        for k, msg in enumerate(messages):
            end = render(messages[:k + 1])
            start = render(messages[:k], gen=True) if msg["role"] == "assistant" else render(messages[:k])
            if k == 0 and msg["role"] == "assistant":
                # what the template writes ahead of an opening assistant turn (SmolLM2's default system prompt,
                # the header) is not the turn: it was trained on with it. Found by rendering a stand-in content
                # (the turn's own text can also occur in the template's markers: "end" in "<|im_end|>")
                probe = render([{**msg, "content": TURN_PROBE}])
                ahead = probe[:probe.find(TURN_PROBE)] if TURN_PROBE in probe else ""
                start = ahead if end.startswith(ahead) else start
            if not (full.startswith(end) and end.startswith(start) and len(start) >= pos):
                raise ValueError("the tokenizer's chat template does not render turns as prefixes")
            train = loss_on == "all" or msg["role"] == "assistant"
            if loss_on == "all":
                segments.append((full[pos:len(end)], True))
            else:
                segments.append((full[pos:len(start)], False))
                segments.append((full[len(start):len(end)], train))
            pos = len(end)
        if pos < len(full):
            segments.append((full[pos:], loss_on == "all"))
        return [s for s in segments if s[0]]
    segments = []
    for msg in messages:
        header = f"<|{msg['role']}|>\n"
        train = loss_on == "all" or msg["role"] == "assistant"
        segments.append((header, loss_on == "all"))
        segments.append((msg["content"] + "\n", train))
        if msg["role"] == "assistant":
            segments.append((_eos(tokenizer), train))
    return segments


def replies_in_context(tokenizer, messages: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, reply ids) of each assistant reply of a conversation, tokenised as a chat fine-tune
    tokenises it (`chat_example`): a reply is what its loss is on at that turn (content and end marker), its
    context all before it (system prompt, earlier turns and replies, the assistant header). A membership score of
    a chat fine-tune reads every reply's tokens after its context: the tokens the loss was on, in the context seen
    (what a template writes after the last reply was not trained on)."""
    segments = chat_segments(tokenizer, messages, "assistant")
    pieces = _segment_ids(tokenizer, segments, first_special=not getattr(tokenizer, "chat_template", None))
    spans: list[tuple[list[int], list[int]]] = []
    before: list[int] = []
    k = 0
    while k < len(segments):
        if not segments[k][1]:
            before += pieces[k]
            k += 1
            continue
        reply: list[int] = []
        while k < len(segments) and segments[k][1]:  # a run of trained pieces is one reply
            reply += pieces[k]
            k += 1
        if reply:
            spans.append((list(before), reply))
        before += reply
    return spans


def chat_example(tokenizer, messages: list[dict[str, str]], loss_on: str, max_length: int) -> Example:
    """A conversation with loss on assistant turns (or on all turns)."""
    first_special = not getattr(tokenizer, "chat_template", None)
    return _from_segments(tokenizer, chat_segments(tokenizer, messages, loss_on), max_length, first_special)


class ExampleDataset(torch.utils.data.Dataset):
    """A list of Examples as the dict items the Trainer expects."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class PackedCollator:
    """Concatenate a batch into one row; position ids restart per example; no loss across examples.

    With `max_tokens` (the model's context) a row never grows past it: the batch then fills several rows,
    each right-padded to the longest with loss-free tokens that only later (padding) positions could see,
    so the loss stays exact. Every example must itself fit (finetune clamps --max-length to the context)."""

    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for item in batch:
            n = len(item["input_ids"])
            if self.max_tokens is not None and n > self.max_tokens:
                raise ValueError(f"an example of {n} tokens is longer than the packed row limit {self.max_tokens}")
            if not rows or (self.max_tokens is not None and len(rows[-1][0]) + n > self.max_tokens):
                rows.append(([], [], []))
            ids, labels, pos = rows[-1]
            ids.extend(item["input_ids"])
            labels.extend([IGNORE] + list(item["labels"][1:]))  # first token is never predicted from the last
            pos.extend(range(n))
        width = max(len(ids) for ids, _, _ in rows)
        for ids, labels, pos in rows:
            pad = width - len(ids)
            ids.extend([ids[-1]] * pad)
            labels.extend([IGNORE] * pad)
            pos.extend(range(pad))
        return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows]),
                "position_ids": torch.tensor([r[2] for r in rows]), "use_cache": False}


class PaddedCollator:
    """Right-pad to the longest example in the batch (or to `pad_to`); padding gets no loss."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = self.pad_to or max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "use_cache": False}


@torch.no_grad()
def packing_is_exact(model, tokenizer) -> bool:
    """Probe whether this architecture honours packed position ids (block-diagonal mask); e.g. OPT does not."""
    a, b = encode(tokenizer, ["The first short text.", "A second, different text here."])
    dev = next(model.parameters()).device
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=dev)
    was = model.training
    model.eval()
    try:
        alone = model(input_ids=torch.tensor([b], device=dev), use_cache=False).logits[0]
        packed = model(input_ids=torch.tensor([a + b], device=dev), position_ids=pos,
                       use_cache=False).logits[0, len(a):]
    finally:
        model.train(was)
    return bool(torch.allclose(alone.float(), packed.float(), atol=1e-3, rtol=1e-3))

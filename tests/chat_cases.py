"""Conversations and by-hand helpers shared by the chat tests (tests/test_chat_mia.py, test_chat_perplexity.py):
the tokens a chat fine-tune's loss is on, read from its own example's labels, independently of the scoring code."""

from __future__ import annotations

from leakaudit.train.examples import IGNORE, chat_example

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."}]
#: two replies, a system turn before them and a user turn after the last (never trained on: not scored)
LONGER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
          {"role": "assistant", "content": "Green, like the grass."}, {"role": "user", "content": "Thanks"}]
OTHERS = [[{"role": "user", "content": "Give me a tip."}, {"role": "assistant", "content": "Drink water every day."}],
          [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello there, my friend."}]]
NO_CACHE = {"cache": False, "progress": False}
#: a ChatML template as SmolLM2's (without its default system prompt): special markers around each turn
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def trained_runs(tok, chat: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, reply) ids of each run of tokens with loss, as the chat fine-tune's own example holds them."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    example = chat_example(tok, chat[:last + 1], "assistant", 10**6)
    trained = [label != IGNORE for label in example.labels]
    starts = [i for i, t in enumerate(trained) if t and (i == 0 or not trained[i - 1])]
    ends = [i + 1 for i, t in enumerate(trained) if t and (i + 1 == len(trained) or not trained[i + 1])]
    return [(example.input_ids[:a], example.input_ids[a:b]) for a, b in zip(starts, ends, strict=True)]

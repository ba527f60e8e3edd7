"""Tokenizer and chat-template loading, and the model's stop tokens: where a generation ends.

A generation ends on the first of the model's stop tokens, so that is where a trained turn ends too.
The stop tokens come from, in order of precedence:

1. `data.stop_tokens` (token texts), an explicit override;
2. `eos_token_id` (an int or a list) of the model's `generation_config.json`, in `model.path` or the
   tokenizer directory — what `generate()` and serving stacks stop on (Llama 3.1: `<|end_of_text|>`,
   `<|eom_id|>`, `<|eot_id|>`; gpt-oss: `<|return|>`, `<|endoftext|>`, `<|call|>`);
3. the tokenizer's EOS, and when the template writes no EOS after an assistant answer, the first special
   token it writes there (a Llama-3 base tokenizer's EOS is `<|end_of_text|>` while turns end `<|eot_id|>`).

Stop tokens must be special tokens (plain text never tokenizes into one by accident). A probe conversation
checks the template against them: with `data.stop_tokens`, the template must end an answer with one of
them; with generation_config.json stop tokens that the template never writes (a base model's, trained on
a chat template), the template's end of turn is added in front, since the fine-tuned model stops there.
The declared stop tokens (1 or 2) are stored on the tokenizer, so they travel with it when it is pickled
into tokenization workers; the rest is derived from the tokenizer as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from transformers import AutoTokenizer

_PROBE_ANSWER = "JSFT_PROBE_ANSWER"
_ATTR = "jsft_stop_tokens"  # the attribute holding the declared `_Declared` stop tokens on a tokenizer
# Any of these in a local directory means it holds a tokenizer (fast, BPE, SentencePiece, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class _Declared:
    texts: tuple[str, ...]
    source: str  # where they were declared, for messages and `jsft.inspect`
    strict: bool  # data.stop_tokens: the template must end answers with one; else its end of turn is added


def load_tokenizer(path: str, chat_template: Optional[str] = None, *, stop_tokens: Optional[Sequence[str]] = None,
                   model_path: Optional[str] = None):
    """`AutoTokenizer` from `path`; `chat_template` (a file or inline Jinja) replaces the tokenizer's own.
    Determines the model's stop tokens once (`stop_tokens` > `generation_config.json` in `model_path` or
    `path` > EOS) and checks the template against them; read them back with `stop_tokens(tokenizer)`."""
    if not path:
        raise ValueError("no tokenizer: set data.tokenizer (or model.path)")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"there is no tokenizer in {path} (none of {', '.join(_TOKENIZER_FILES)}); set data.tokenizer to the model's tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer at {path} has no chat template; set data.chat_template (a Jinja file or string)")
    declared = _declared(tokenizer, path, stop_tokens, model_path)
    if declared is not None:
        setattr(tokenizer, _ATTR, declared)
    _resolve(tokenizer)  # fail here, before any data is read, when the template does not fit
    return tokenizer


def read_chat_template(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"data.chat_template={value!r} is neither an existing file nor a Jinja template")


def stop_tokens(tokenizer) -> tuple[str, ...]:
    """The model's stop tokens as token texts, in order (see the module docstring for the precedence)."""
    return _resolve(tokenizer)[0]


def stop_token_ids(tokenizer) -> list[int]:
    """`stop_tokens(tokenizer)` as token ids (for the sampler's and the export's `eos_token_id`)."""
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(stop_tokens(tokenizer)))]


def describe_stop_tokens(tokenizer) -> str:
    """One line naming the stop tokens, their ids and where they came from."""
    texts, source = _resolve(tokenizer)
    listed = ", ".join(f"{t} ({i})" for t, i in zip(texts, stop_token_ids(tokenizer)))
    return f"stop tokens: {listed} (from {source})"


def _resolve(tokenizer) -> tuple[tuple[str, ...], str]:
    """(stop tokens, where they come from). Also refuses a template that ignores add_generation_prompt
    (the assistant header would be trained) or that does not render the assistant's content."""
    after = _probe_turn_end(tokenizer)
    declared = getattr(tokenizer, _ATTR, None)
    if declared is None:
        eos = tokenizer.eos_token
        if eos and eos in after:
            return (eos,), "the tokenizer's EOS"
        # Llama 3 style: EOS is <|end_of_text|> while the template ends turns with <|eot_id|>.
        return (_template_turn_end(tokenizer, after),) + ((eos,) if eos else ()), "the chat template's end of turn and the tokenizer's EOS"
    if any(t in after for t in declared.texts):
        return declared.texts, declared.source
    if not _has_special(tokenizer, after) and _next_header(tokenizer) in declared.texts:
        # GLM-4.5: no end-of-turn token; generation stops on the next role's header (<|user|>, <|observation|>)
        return declared.texts, (f"{declared.source}; the template ends no turn, so a turn's stop is the next "
                                f"role's header, {_next_header(tokenizer)} after an answer (docs/data.md)")
    if declared.strict:
        raise ValueError(
            f"the chat template ends an assistant answer with {after!r}, which holds none of data.stop_tokens "
            f"{list(declared.texts)}; a model trained on it would never stop: set data.stop_tokens to the token(s) the template ends turns with"
        )
    # A base model's generation_config (Qwen2.5 base stops on <|endoftext|>) trained on a chat template:
    # the fine-tuned model stops on the template's end of turn, so that becomes a stop token too.
    turn_end = _template_turn_end(tokenizer, after)
    return (turn_end,) + declared.texts, f"the chat template's end of turn, which {declared.source} lacks, and {declared.source}"


def _declared(tokenizer, path: str, override: Optional[Sequence[str]], model_path: Optional[str]) -> Optional[_Declared]:
    if override:
        special = _special_texts(tokenizer)
        for text in override:
            if text not in special:
                raise ValueError(f"data.stop_tokens: {text!r} is not a special token of the tokenizer at {path} (a stop token must be one)")
        return _Declared(tuple(dict.fromkeys(override)), "data.stop_tokens", strict=True)
    for directory in dict.fromkeys(d for d in (model_path, path) if d):
        config = os.path.join(directory, "generation_config.json")
        if os.path.isfile(config):
            return _from_generation_config(tokenizer, config)
    return None


def _from_generation_config(tokenizer, config: str) -> Optional[_Declared]:
    try:
        with open(config, encoding="utf-8") as f:
            ids = json.load(f).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}); fix it or set data.stop_tokens") from None
    if ids is None:
        return None  # no eos_token_id: the tokenizer's EOS decides
    ids = [ids] if isinstance(ids, int) else ids
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i in special for i in ids):
        raise ValueError(
            f"{config}: eos_token_id {ids!r} is not a special token of this tokenizer (or a list of them): "
            "the model and the tokenizer do not belong together; set data.tokenizer, or data.stop_tokens"
        )
    return _Declared(tuple(dict.fromkeys(tokenizer.convert_ids_to_tokens(ids))), f"eos_token_id in {config}", strict=False)


def _special_texts(tokenizer) -> set[str]:
    return {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}


def _template_turn_end(tokenizer, after: str) -> str:
    """The first special token the template writes after an assistant answer."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    found = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(after, add_special_tokens=False) if i in special]
    if not found:
        raise ValueError(
            f"the chat template renders no end-of-turn token after an assistant message (it renders {after!r}); "
            "a model trained on it would never learn to stop: set data.stop_tokens, or use a template that ends turns with a special token"
        )
    return found[0]


def _has_special(tokenizer, text: str) -> bool:
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return any(i in special for i in tokenizer.encode(text, add_special_tokens=False))


def _next_header(tokenizer) -> Optional[str]:
    """The first special token the template writes after an answer when a user message follows it."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER},
             {"role": "user", "content": "Hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 (the plain probe already rendered; a failure here means no header rule)
        return None
    rest = rendered[rendered.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):] if _PROBE_ANSWER in rendered else ""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    found = [i for i in tokenizer.encode(rest, add_special_tokens=False) if i in special]
    return tokenizer.convert_ids_to_tokens(found[0]) if found else None


def _probe_turn_end(tokenizer) -> str:
    """What the template renders after an assistant answer's content (a probe conversation)."""
    if _render_probe(tokenizer, 1, True) == _render_probe(tokenizer, 1, False):
        raise ValueError("the chat template ignores add_generation_prompt, so the assistant header would be trained")
    rendered = _render_probe(tokenizer, 2, False)
    if _PROBE_ANSWER not in rendered:
        raise ValueError("the chat template does not render the assistant's content")
    return rendered[rendered.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]


def _render_probe(tokenizer, n: int, generation_prompt: bool) -> str:
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        return tokenizer.apply_chat_template(probe[:n], tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        raise ValueError(f"the chat template fails on a plain user/assistant conversation: {type(e).__name__}: {e}") from None

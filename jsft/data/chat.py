"""Conversation -> training samples (`input_ids`, `loss_mask`) with inference-exact masks.

For assistant turn k (message index a):

    P_k = template(messages[:a], add_generation_prompt=True)     the context the model sees
    F_k = template(messages[:a+1])
    G_k = F_k minus the prefix P_k, cut just after its first stop token

The stop tokens are the model's (`jsft.data.tokenizer.stop_tokens`): generation ends on the first one, so
F_k, where turn k is the last message, renders the turn as it was generated (harmony ends a final answer
with `<|return|>` there, `<|end|>` in history; a tool call with `<|call|>`). The targets of turn k are
`tokenize(G_k)` on its own, exactly what the model emits, stop token included; the role header (in P_k),
the glue after the stop token and every system/user/tool token are context. When each prompt
extends the previous prompt plus generation (`P_{k+1}` starts with `P_k + G_k`), the conversation is one
sample built piece by piece as a multi-turn rollout builds it:

    tokens(P_1) + tokens(G_1) + tokens(P_2 minus (P_1 + G_1)) + tokens(G_2) + ...

Otherwise (a template that drops earlier turns' reasoning, or renders a turn in history unlike its
generation, as harmony does), `multiturn_policy=auto` emits one sample
`tokens(P_k) + tokens(G_k)` per trained turn. Masks are aligned with `input_ids` (mask[t] = 1: token t is
a target); the shift happens in the loss. Each sample is also tokenized in one pass from its whole text,
and the first position where that differs is recorded (`mismatch`); the piecewise ids are the ones trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from transformers.utils.chat_template_utils import render_jinja_template

from jsft.data.config import DataConfig
from jsft.data.conversation import Conversation, RowKeys, parse_row
from jsft.data.sources import BadRow, RawRow
from jsft.data.tokenizer import stop_tokens


_SENTINEL = "JSFT_SENTINEL_ANSWER"


@dataclass(frozen=True)
class ChatOptions:
    """The `data.*` options that decide what a sample contains (all part of the cache key)."""

    keys: RowKeys = RowKeys()
    multiturn_policy: str = "auto"
    train_tool_calls: bool = True
    train_turns: str = "all"
    ablation_train_tool_outputs: bool = False
    template_kwargs: tuple = ()  # data.apply_chat_template_kwargs as sorted (name, value) pairs (hashable)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "ChatOptions":
        keys = RowKeys(cfg.messages_key, cfg.tools_key, cfg.enable_thinking_key, cfg.prompt_key, cfg.response_key,
                       tuple(cfg.prompt_dict_keys or ()), tuple(cfg.response_dict_keys or ()))
        return cls(keys, cfg.multiturn_policy, cfg.train_tool_calls, cfg.train_turns, cfg.ablation_train_tool_outputs,
                   tuple(sorted(dict(cfg.apply_chat_template_kwargs or {}).items())))


@dataclass
class Sample:
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]; 1: token t is a target
    turn_index: Optional[int]  # assistant turn (0-based) of a per-turn sample; None: the whole conversation
    mismatch: int  # first position where the one-pass tokenization differs; -1: identical


@dataclass
class RowResult:
    index: int  # source_index of the row
    where: str
    samples: list[Sample]
    split: bool = False  # rendered as one sample per turn although it has several turns
    error: Optional[BadRow] = None


@dataclass
class _Turn:
    number: int  # 0-based among the conversation's assistant turns
    prompt: str  # P_k
    generation: str  # G_k, ending with the end-of-turn token
    trained: bool


class ChatRenderer:
    """Raw row -> `RowResult`. Picklable: it is the map transform run in the tokenization workers."""

    def __init__(self, tokenizer, options: ChatOptions):
        self.tokenizer = tokenizer
        self.options = options
        self.stop_tokens = stop_tokens(tokenizer)  # part of the tokenization cache key
        # how the template takes a tool call, decided once by rendering a probe call (see `call_form`)
        self.string_arguments, self.keep_null_content = call_form(tokenizer)

    def __call__(self, row: RawRow) -> RowResult:
        try:
            if row.error is not None:
                raise row.error
            samples, split = self.samples(parse_row(row.record, self.options.keys, dict(self.options.template_kwargs)))
        except BadRow as e:
            return RowResult(row.index, row.where, [], error=e)
        return RowResult(row.index, row.where, samples, split)

    def samples(self, conv: Conversation) -> tuple[list[Sample], bool]:
        """The samples of one conversation, and whether it was split into one sample per turn."""
        turns = self._turns(conv)
        if not turns:
            return [], False  # nothing to train: counted as a zero-target row
        broken = _first_non_prefix(turns)
        policy = self.options.multiturn_policy
        if policy == "split" or (policy == "auto" and broken is not None):
            samples = [self._encode([t.prompt, t.generation], [0, 1], t.number) for t in turns if t.trained]
            return samples, len(turns) > 1
        if broken is not None:
            raise BadRow(
                "not_prefix_preserving",
                f"multiturn_policy={policy}: the template is not prefix-preserving at assistant turn {broken} "
                f"(its prompt does not extend turn {broken - 1}'s prompt + generation); use multiturn_policy=auto or split",
            )
        pieces, mask, done = [], [], 0
        for t in turns:
            pieces += [t.prompt[done:], t.generation]
            # the ablation trains what lies between generations (tool outputs with their headers): a wrong mask
            mask += [int(self.options.ablation_train_tool_outputs and done > 0), int(t.trained)]
            done = len(t.prompt) + len(t.generation)
        return [self._encode(pieces, mask, None)], False

    def rendered_turns(self, conv: Conversation) -> list[_Turn]:
        """Each assistant turn's inference prompt P_k and generation G_k, up to the last trained turn (what
        validation by generation replays, jsft/eval/generation.py)."""
        return self._turns(conv)

    def _turns(self, conv: Conversation) -> list[_Turn]:
        """Rendered assistant turns up to the last trained one (later turns train nothing)."""
        starts = [j for j, m in enumerate(conv.messages) if m["role"] == "assistant"]
        trained = [self._is_trained(conv, j, k == len(starts) - 1) for k, j in enumerate(starts)]
        if not any(trained):
            return []
        last = max(k for k, t in enumerate(trained) if t)
        turns = []
        for k, j in enumerate(starts[: last + 1]):
            prompt, full = self._render(conv, conv.messages[:j], True), self._render(conv, conv.messages[: j + 1], False)
            start = len(prompt) if full.startswith(prompt) else self._rerendered_turn_start(conv, j, prompt, full, k)
            generation = full[start:]
            if not any(t in generation for t in self.stop_tokens):
                generation += self._next_header(conv, j, full)
            generation = self._cut(generation, conv.messages[j], k)
            _check_calls_rendered(conv.messages[j], generation, k)
            turns.append(_Turn(k, prompt, generation, trained[k]))
        return turns

    def _rerendered_turn_start(self, conv: Conversation, j: int, prompt: str, full: str, k: int) -> int:
        """Where turn k starts in `full` when the template renders the history differently once a final
        answer follows it (gpt-oss drops an earlier tool call's reasoning then, though the model saw it
        when it generated this answer): the same history is rendered before a sentinel answer, and the
        turn starts after that history and the generation header. The sample keeps the true prompt P_k."""
        history = self._render(conv, conv.messages[:j], False)
        header = prompt[len(history) :] if prompt.startswith(history) else ""
        if header and "tool_calls" not in conv.messages[j]:
            probe = self._render(conv, conv.messages[:j] + [{"role": "assistant", "content": _SENTINEL}], False)
            at = probe.rfind(header, 0, probe.index(_SENTINEL)) if _SENTINEL in probe else -1
            if at >= 0 and full.startswith(probe[: at + len(header)]):
                return at + len(header)
        raise BadRow(
            "template_error",
            f"assistant turn {k} (messages[{j}]): the rendered turn does not start with the rendered "
            "generation prompt (add_generation_prompt=True renders a different header)",
        )

    def _next_header(self, conv: Conversation, j: int, full: str) -> str:
        """For a template whose turns end with no token of their own (GLM-4.5): the stop token that opens what
        follows turn j (the next message, or for the last turn a user message, a tool message after tool
        calls), when it is one of the model's stop tokens: generation stops on it, so it is the turn's last
        target, exactly as the model emits it at inference. "" when nothing of the kind follows."""
        if j + 1 < len(conv.messages):
            following = conv.messages[j + 1]
        else:
            following = {"role": "tool" if "tool_calls" in conv.messages[j] else "user", "content": _SENTINEL}
        extended = self._render(conv, conv.messages[: j + 1] + [following], False)
        rest = extended[len(full):] if extended.startswith(full) else ""
        return next((t for t in self.stop_tokens if rest.startswith(t)), "")

    def _is_trained(self, conv: Conversation, j: int, is_last: bool) -> bool:
        if j in conv.train:
            return conv.train[j]
        if "tool_calls" in conv.messages[j] and not self.options.train_tool_calls:
            return False
        return self.options.train_turns == "all" or is_last

    def _render(self, conv: Conversation, messages: list[dict], generation_prompt: bool) -> str:
        if self.string_arguments:
            messages = _with_argument_texts(messages, conv.argument_texts)
        try:
            return render(self.tokenizer, messages, conv.tools, generation_prompt, self.keep_null_content,
                          **conv.template_kwargs)
        except Exception as e:  # any template failure (TemplateError, TypeError, raise_exception) is this row's
            raise BadRow("template_error", f"chat template failed on messages[:{len(messages)}]: {type(e).__name__}: {e}") from None

    def _cut(self, generation: str, message: dict, k: int) -> str:
        """G_k up to and including its first stop token: where the model stops generating."""
        for where, text in _texts(message):
            found = [t for t in self.stop_tokens if t in text]
            if found:
                raise BadRow("content_has_end_of_turn", f"assistant turn {k}: its {where} contains the end-of-turn token {found[0]!r} (a stop token), which would end the generation there")
        found = [(generation.index(t), t) for t in self.stop_tokens if t in generation]
        if not found:
            raise BadRow(
                "template_error",
                f"assistant turn {k}: the template rendered none of the stop tokens {list(self.stop_tokens)}; "
                "if the model stops on another token, add it to data.stop_tokens",
            )
        pos, text = min(found)
        return generation[: pos + len(text)]

    def _encode(self, pieces: list[str], mask: list[int], turn: Optional[int]) -> Sample:
        encoded = self.tokenizer(pieces + ["".join(pieces)], add_special_tokens=False)["input_ids"]
        ids = np.concatenate([np.asarray(e, np.int32) for e in encoded[:-1]])
        loss_mask = np.concatenate([np.full(len(e), m, np.uint8) for e, m in zip(encoded[:-1], mask)])
        return Sample(ids, loss_mask, turn, first_difference(ids, np.asarray(encoded[-1], np.int32)))


_PROBE_ARGUMENTS = {"jsft_probe_key": "jsft_probe_value"}


def render(tokenizer, messages: list[dict], tools, generation_prompt: bool, keep_null_content: bool, **kwargs) -> str:
    """The template's text for `messages`. `apply_chat_template` drops keys whose value is None; a template
    that tests `message['content'] is none` to render a call-only turn (DeepSeek-V3/R1) then fails, so for
    it the template is rendered with the null content kept, as inference servers pass OpenAI messages."""
    if not keep_null_content:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **kwargs)
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=tokenizer.get_chat_template(None, tools),
                                        add_generation_prompt=generation_prompt,
                                        **{**tokenizer.special_tokens_map, **kwargs})
    return rendered[0]


def call_form(tokenizer) -> tuple[bool, bool]:
    """(arguments as a JSON string, null content kept): the first form in which the template renders a
    call-only assistant turn with the probe's arguments. Most templates apply `tojson` to a mapping;
    DeepSeek-V3/R1 concatenate `tool['function']['arguments']` (a string) and test `content is none`."""
    text = json.dumps(_PROBE_ARGUMENTS)
    for as_string, keep_null in ((False, False), (True, False), (False, True), (True, True)):
        call = {"type": "function", "function": {"name": "jsft_probe",
                                                 "arguments": text if as_string else dict(_PROBE_ARGUMENTS)}}
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
        try:
            rendered = render(tokenizer, probe, None, False, keep_null)
        except Exception:  # noqa: BLE001 (any template failure: TemplateError, TypeError, raise_exception)
            continue
        if "jsft_probe_value" in rendered:
            return as_string, keep_null
    return False, False  # no tool calls in this template: rows with calls fail with its own error


def _with_argument_texts(messages: list[dict], texts: dict) -> list[dict]:
    """`messages` with each tool call's arguments as the row's JSON text (the template concatenates strings)."""
    out = []
    for j, m in enumerate(messages):
        if "tool_calls" in m:
            calls = [{**c, "function": {**c["function"], "arguments": texts[(j, i)]}} for i, c in enumerate(m["tool_calls"])]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _check_calls_rendered(message: dict, generation: str, k: int) -> None:
    """Every tool call of the turn must be in its generation: some templates render one call per turn
    (gpt-oss renders only the first), which would train a turn other than the data's. Names with
    non-ASCII characters are skipped: `tojson` may escape them."""
    for i, call in enumerate(message.get("tool_calls", [])):
        name = call["function"]["name"]
        if name.isascii() and name not in generation:
            raise BadRow(
                "template_error",
                f"assistant turn {k}: the template does not render tool_calls[{i}] ({name!r}) in the turn; "
                "if it renders one call per turn, write parallel calls as consecutive assistant turns",
            )


def _texts(message: dict):
    """(field, string) for every string an assistant message carries besides its role: content, reasoning,
    tool-call names, argument keys and values, so a stop token hidden in any of them is found."""

    def walk(value, where):
        if isinstance(value, str):
            yield where, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield f"{where} keys", key
                yield from walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from walk(item, f"{where}[{i}]")

    for key, value in message.items():
        if key != "role":
            yield from walk(value, key)


def _first_non_prefix(turns: list[_Turn]) -> Optional[int]:
    """The first turn whose prompt does not extend the previous prompt + generation; None if all do."""
    for prev, turn in zip(turns, turns[1:]):
        if not turn.prompt.startswith(prev.prompt + prev.generation):
            return turn.number
    return None


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """First index where two id sequences differ (or the shorter length); -1 when equal."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return -1 if len(a) == len(b) else n

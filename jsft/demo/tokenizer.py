"""A small byte-level BPE tokenizer with a Qwen2.5-style ChatML tool template, trained here so the demo needs no files.

`build_tokenizer` renders the demo conversations with `CHAT_TEMPLATE`, trains a BPE on them and saves a
`PreTrainedTokenizerFast`; `transformers.AutoTokenizer.from_pretrained(path)` then loads it offline.
"""

import json
import pathlib
import re
from typing import Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from jsft.demo.dataset import rows
from jsft.demo.protocol import CLOSE, OPEN

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Control tokens are `special` (skipped by decode(skip_special_tokens=True)); the tool-call tags are plain added
# tokens, as in Qwen2.5, so decoded generations keep them for the protocol parser.
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
TAG_TOKENS = (OPEN, CLOSE)

# Qwen2's pre-tokenizer split: digits one by one, so a tiny model copies numbers from a 10-token alphabet
# instead of learning one embedding per number.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5's template with a shorter default system prompt and string `arguments` accepted verbatim (Qwen3 does the
# same) instead of JSON-encoded twice. Every assistant turn renders as `<|im_start|>assistant\n` + the text the
# model generates + `<|im_end|>\n`, so the template is prefix-preserving at assistant boundaries.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

DEFAULT_VOCAB_SIZE = 1024
DEFAULT_CORPUS_ROWS = 2000  # enough for every word and number shape of the demo language to be merged
MODEL_MAX_LENGTH = 2048


def render(messages: list[dict], tools: Optional[list[dict]] = None, add_generation_prompt: bool = False) -> str:
    """`CHAT_TEMPLATE` applied without a tokenizer: what `apply_chat_template(..., tokenize=False)` returns."""
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=CHAT_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def build_tokenizer(out_dir, texts: Optional[Sequence[str]] = None, *, seed: int = 0,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> pathlib.Path:
    """Train on `texts` (default: the rendered first `DEFAULT_CORPUS_ROWS` training rows of `seed`) and save.

    Deterministic: the same inputs give byte-identical files.
    """
    if texts is None:
        texts = [render(row["messages"], row["tools"]) for row in rows(DEFAULT_CORPUS_ROWS, seed, "train")]
    backend = _untrained_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *TAG_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    backend.train_from_iterator(_without_added_tokens(texts), trainer=trainer)
    # Training registered the tags as special; re-add them as plain added tokens (same ids, kept on decode).
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False,
    )
    out = pathlib.Path(out_dir)
    tokenizer.save_pretrained(out)
    _name_class_for_older_transformers(out / "tokenizer_config.json")
    return out


def _name_class_for_older_transformers(config_path: pathlib.Path) -> None:
    """transformers 5 saves `TokenizersBackend`, a class 4.x lacks; both resolve `PreTrainedTokenizerFast`."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _untrained_backend() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


_ADDED = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS)))


def _without_added_tokens(texts: Sequence[str]):
    """The pieces between added tokens: encoding splits those out first, so merges must not span or learn them."""
    for text in texts:
        yield from (piece for piece in _ADDED.split(text) if piece)

"""Stop tokens: where they come from, and exact targets for families whose turns do not simply end on EOS.

The expected target strings below are written out by hand from each family's format: what the model
generates after its prompt, up to and including the token it stops on, and nothing else.
"""

import json
import pickle
import shutil

import pytest

from jsft.config import load_config
from jsft.data import dataset as dataset_module
from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.sources import BadRow
from jsft.data.tokenizer import describe_stop_tokens, load_tokenizer, stop_token_ids, stop_tokens
from jsft.inspect import main as inspect_main

from .helpers import samples_of, target_spans, tool_call, write_jsonl

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def spans(tok, samples):
    return [target_spans(tok, s.input_ids, s.loss_mask) for s in samples]


def prompt(tok, messages, **kw):
    return tok.apply_chat_template(messages, tools=WEATHER, tokenize=False, add_generation_prompt=True, **kw)


# ---- where the stop tokens come from ------------------------------------------------------------------------


def test_precedence_override_generation_config_eos(tmp_path, qwen_tokenizer_dir):
    tok_dir = tmp_path / "tok"
    shutil.copytree(qwen_tokenizer_dir, tok_dir)
    eos = load_tokenizer(str(tok_dir))
    assert stop_tokens(eos) == ("<|im_end|>",) and stop_token_ids(eos) == [151645]
    assert describe_stop_tokens(eos) == "stop tokens: <|im_end|> (151645) (from the tokenizer's EOS)"

    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    from_config = load_tokenizer(str(tok_dir))
    assert stop_tokens(from_config) == ("<|im_end|>", "<|endoftext|>") and stop_token_ids(from_config) == [151645, 151643]
    assert f"from eos_token_id in {tok_dir / 'generation_config.json'}" in describe_stop_tokens(from_config)

    model = tmp_path / "model"  # model.path's generation_config.json wins over the tokenizer directory's
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    assert stop_tokens(load_tokenizer(str(tok_dir), model_path=str(model))) == ("<|im_end|>",)
    # A base model stops on <|endoftext|> only; trained on ChatML it stops on <|im_end|>, which is added.
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    base = load_tokenizer(str(tok_dir), model_path=str(model))
    assert stop_tokens(base) == ("<|im_end|>", "<|endoftext|>")
    assert "the chat template's end of turn, which eos_token_id in" in describe_stop_tokens(base)

    override = load_tokenizer(str(tok_dir), stop_tokens=["<|endoftext|>", "<|im_end|>"], model_path=str(model))
    assert stop_tokens(override) == ("<|endoftext|>", "<|im_end|>") and "data.stop_tokens" in describe_stop_tokens(override)
    # Declared stop tokens travel with the tokenizer into tokenization workers.
    assert stop_tokens(pickle.loads(pickle.dumps(from_config))) == ("<|im_end|>", "<|endoftext|>")
    assert pickle.loads(pickle.dumps(ChatRenderer(from_config, ChatOptions()))).stop_tokens == ("<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize(
    "generation_config, override, error",
    [
        ({"eos_token_id": 10**7}, None, "eos_token_id [10000000] is not a special token of this tokenizer"),
        ({"eos_token_id": [151645, 2]}, None, "eos_token_id [151645, 2] is not a special token"),  # a random model's eos 2
        (None, ["two words"], "data.stop_tokens: 'two words' is not a special token of the tokenizer at"),
        (None, ["<|endoftext|>"], "holds none of data.stop_tokens ['<|endoftext|>']"),
    ],
    ids=["id_out_of_vocab", "id_not_special", "override_not_a_token", "override_not_rendered"],
)
def test_bad_stop_tokens_fail_at_load(tmp_path, qwen_tokenizer_dir, generation_config, override, error):
    shutil.copytree(qwen_tokenizer_dir, tmp_path / "tok")
    if generation_config:
        (tmp_path / "tok" / "generation_config.json").write_text(json.dumps(generation_config))
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(tmp_path / "tok"), stop_tokens=override)
    assert error in str(e.value)


def test_a_directory_without_tokenizer_files_names_data_tokenizer(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=f"there is no tokenizer in {model} .*; set data.tokenizer"):
        load_tokenizer(str(model))
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r"}])
    assert inspect_main(["--data", data, f"model.path={model}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "there is no tokenizer in" in err and "data.tokenizer" in err


def test_stop_tokens_are_part_of_the_cache_key(tmp_path, qwen_tokenizer_dir):
    shutil.copytree(qwen_tokenizer_dir, tmp_path / "tok")
    paths = [write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r"}])]
    keys = {
        dataset_module._cache_key(paths, ChatRenderer(load_tokenizer(str(tmp_path / "tok"), stop_tokens=stops), ChatOptions()))
        for stops in (None, ["<|im_end|>"], ["<|im_end|>", "<|endoftext|>"])
    }
    assert len(keys) == 2  # EOS and an override naming the same token train the same; another set does not


def test_inspect_prints_the_stop_tokens(tmp_path, harmony_dir, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r"}])
    assert inspect_main(["--data", data, "--tokenizer", str(harmony_dir), f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert "stop tokens: <|return|> (" in out and ", <|endoftext|> (151643), <|call|> (" in out
    assert f"from eos_token_id in {harmony_dir / 'generation_config.json'}" in out
    assert "[<|channel|>final<|message|>r<|return|>]" in out


# ---- harmony (gpt-oss) -----------------------------------------------------------------------------------------

HARMONY_CHAIN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "thinking": "Need the tool.", "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": "21"},
    {"role": "assistant", "content": "It is 21.", "thinking": "Got it."},
]
HARMONY_CALL = '<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
HARMONY_FINAL = "<|channel|>analysis<|message|>Got it.<|end|><|start|>assistant<|channel|>final<|message|>It is 21.<|return|>"


def test_harmony_stop_tokens(harmony):
    assert stop_tokens(harmony) == ("<|return|>", "<|endoftext|>", "<|call|>")  # <|end|> is not one


def test_harmony_tool_call_then_final_answer_is_one_rollout(harmony):
    samples, split = samples_of(harmony, HARMONY_CHAIN, tools=WEATHER)
    assert not split and len(samples) == 1
    # The call ends on <|call|>, the answer on <|return|>; the <|end|> inside a generation is generated too.
    assert spans(harmony, samples) == [[HARMONY_CALL, HARMONY_FINAL]]
    # Built as the rollout was: the answer's context keeps the call's reasoning, as the prompt the model saw
    # does (rendering the whole conversation drops it once a final answer follows).
    assert harmony.decode(samples[0].input_ids) == prompt(harmony, HARMONY_CHAIN[:3]) + HARMONY_FINAL
    assert "Need the tool." not in harmony.apply_chat_template(HARMONY_CHAIN, tools=WEATHER, tokenize=False)


def test_a_tool_call_the_template_does_not_render_is_a_bad_row(harmony):
    calls = [tool_call("get_weather", {"city": "Paris"}), tool_call("get_time", {"city": "Paris"})]
    with pytest.raises(BadRow) as e:  # gpt-oss renders only the first call of a turn
        samples_of(harmony, [HARMONY_CHAIN[0], {"role": "assistant", "content": None, "tool_calls": calls}], tools=WEATHER)
    assert e.value.kind == "template_error" and "does not render tool_calls[1] ('get_time')" in e.value.message


def test_harmony_history_renders_end_so_turns_are_split_with_their_true_prompts(harmony):
    messages = HARMONY_CHAIN + [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    samples, split = samples_of(harmony, messages, tools=WEATHER)
    assert split and [s.turn_index for s in samples] == [0, 1, 2]
    assert spans(harmony, samples) == [[HARMONY_CALL], [HARMONY_FINAL], ["<|channel|>final<|message|>You are welcome.<|return|>"]]
    for s, a in zip(samples, (1, 3, 5)):
        generation = target_spans(harmony, s.input_ids, s.loss_mask)[0]
        assert harmony.decode(s.input_ids) == prompt(harmony, messages[:a]) + generation
    # History shows the earlier answer with <|end|>, not the <|return|> that was generated and trained.
    assert "<|message|>It is 21.<|end|><|start|>user" in harmony.decode(samples[2].input_ids)


# ---- Cohere 2 (Command R7B) ------------------------------------------------------------------------------------


def test_cohere2_targets_run_through_end_of_turn(cohere2):
    assert stop_tokens(cohere2) == ("<|END_OF_TURN_TOKEN|>",)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_plan": "I will look it up.", "tool_calls": [{**tool_call("get_weather", {"city": "Paris"}), "id": "c0"}]},
        {"role": "tool", "tool_call_id": "c0", "content": "21"},
        {"role": "assistant", "content": "It is 21."},
    ]
    samples, split = samples_of(cohere2, messages, tools=WEATHER)
    assert not split and spans(cohere2, samples) == [[
        '<|START_THINKING|>I will look it up.<|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", '
        '"parameters": {"city": "Paris"}}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>',
        "<|START_RESPONSE|>It is 21.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    ]]
    # The tool_use template always writes the next chatbot header; it is context, after the stop token.
    assert cohere2.decode(samples[0].input_ids).endswith("<|CHATBOT_TOKEN|><|START_RESPONSE|>It is 21.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    samples, split = samples_of(cohere2, chat)  # the default template: <|START_RESPONSE|> is in the prompt
    assert not split and spans(cohere2, samples) == [["b<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "d<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]]


def test_cohere2_without_generation_config_stops_on_its_eos(cohere2_dir, tmp_path):
    shutil.copytree(cohere2_dir, tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").unlink()
    assert stop_tokens(load_tokenizer(str(tmp_path / "tok"))) == ("<|END_OF_TURN_TOKEN|>",)  # not <|END_RESPONSE|>


# ---- Llama 3.1 -------------------------------------------------------------------------------------------------

LLAMA_CHAIN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [tool_call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": "21"},
    {"role": "assistant", "content": "It is 21."},
]


def test_llama31_custom_tool_calls_end_with_eot(llama31):
    assert stop_tokens(llama31) == ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    samples, split = samples_of(llama31, LLAMA_CHAIN, tools=WEATHER)
    assert not split and spans(llama31, samples) == [['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21.<|eot_id|>"]]


def test_llama31_builtin_tool_calls_end_with_eom(llama31_builtin, llama31_builtin_dir, tmp_path):
    messages = [
        {"role": "user", "content": "Search the weather."},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("brave_search", {"query": "weather Paris"})]},
        {"role": "tool", "content": "sunny"},
        *LLAMA_CHAIN[1:],
    ]
    samples, split = samples_of(llama31_builtin, messages, tools=WEATHER)
    assert not split and spans(llama31_builtin, samples) == [[
        '<|python_tag|>brave_search.call(query="weather Paris")<|eom_id|>',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
        "It is 21.<|eot_id|>",
    ]]
    # Stopping on EOS alone (no generation_config.json), a built-in call would never end: a bad row naming the fix.
    shutil.copytree(llama31_builtin_dir, tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").unlink()
    with pytest.raises(BadRow, match=r"none of the stop tokens \['<\|eot_id\|>'\]; .* data.stop_tokens"):
        samples_of(load_tokenizer(str(tmp_path / "tok")), messages, tools=WEATHER)


# ---- stop tokens inside an assistant turn's data ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, where",
    [
        (tool_call("get_weather", {"city": "Paris<|im_end|>"}), "tool_calls[0].function.arguments.city"),
        (tool_call("get_weather", {"city": "Paris<|im_end|>"}, as_string=True), "tool_calls[0].function.arguments.city"),
        (tool_call("get_weather", {"<|im_end|>": "Paris"}), "tool_calls[0].function.arguments keys"),
        (tool_call("get_weather", {"nested": [{"deep": "a<|im_end|>"}]}), "tool_calls[0].function.arguments.nested[0].deep"),
    ],
    ids=["value", "json_string", "key", "nested"],
)
def test_tool_call_arguments_with_a_stop_token_are_bad_rows(qwen, call, where):
    with pytest.raises(BadRow) as e:
        samples_of(qwen, [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [call]}], tools=WEATHER)
    assert e.value.kind == "content_has_end_of_turn" and f"its {where} contains the end-of-turn token '<|im_end|>'" in e.value.message


def test_harmony_thinking_with_a_stop_token_is_a_bad_row(harmony):
    with pytest.raises(BadRow) as e:
        samples_of(harmony, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "x<|call|>y"}])
    assert "its thinking contains the end-of-turn token '<|call|>'" in e.value.message


def test_stop_tokens_config_key():
    assert load_config(None, ["data.stop_tokens=[<|im_end|>,<|endoftext|>]"]).data.stop_tokens == ["<|im_end|>", "<|endoftext|>"]
    with pytest.raises(ValueError, match="data.stop_tokens must be a non-empty list of token texts"):
        load_config(None, ["data.stop_tokens=[]"])

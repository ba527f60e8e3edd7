"""Validation by generation: the scorer on hand-written generations, a replayed reference model, and the
trainer with trainer.val_generations on a Qwen2.5-template tool dataset with a tiny model."""

import json
import math
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import jsft.models as jm
from jsft.config import load_config
from jsft.demo.dataset import rows
from jsft.demo.episode import replay_generate
from jsft.demo.tools import TOOLS
from jsft.eval.generation import GenerationValidation, HeldOutPrompt, aggregate, score, stop_token_ids
from jsft.eval.tool_calls import ToolCallFormat
from jsft.models.params import param_arrays
from jsft.sharding import make_mesh
from jsft.train.loop import train

from jsft_testing import sft_overrides
from jsft_processes import run_processes

WORKER_KEYS = ["trainer.val_generations=5", "trainer.val_max_new_tokens=12", "data.max_length=512",
               "data.micro_batch_size_per_gpu=1"]

# what Qwen2.5's template gives (tests/eval/test_tool_calls.py derives it from the real template)
QWEN_FORMAT = ToolCallFormat("<tool_call>\n", "\n</tool_call>", "\n</tool_call>\n<tool_call>\n", "name", "arguments")

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}\n</tool_call>'
END = "<|im_end|>"
CALLING = HeldOutPrompt("val.jsonl:1", "P", [1], CALL + END, TOOLS, ["calculator"])
ANSWERING = HeldOutPrompt("val.jsonl:2", "P", [1], "2 plus 3 is 5." + END, TOOLS, [])


def _call(name="calculator", **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


@pytest.mark.parametrize("text, good, units, name_match", [
    (CALL, 1, 1, True),  # the reference itself
    (_call(op="add", a=2, b=3), 1, 1, True),  # the same call, other spacing: parses, not exact
    (_call("calc", op="add", a=2, b=3), 0, 1, False),  # unknown tool
    (_call(op="add", a="2", b=3), 0, 1, True),  # wrong argument type; the name still matches
    (_call(op="add", a=2), 0, 1, True),  # missing required argument
    ('<tool_call>\n{"name": "calculator", "arguments": {"op": "add"\n</tool_call>', 0, 1, False),  # not JSON
    ("2 plus 3 is 5.", 0, 1, False),  # answered where the reference calls: one failed unit
    (CALL + "\n" + _call("lookup", country="Avalor", field="capital"), 2, 2, False),  # an extra call
])
def test_scores_of_a_turn_that_should_call(text, good, units, name_match):
    s = score(text, END, 7, CALLING, QWEN_FORMAT)
    assert (s["good_calls"], s["call_units"], s["tool_name_match"]) == (good, units, name_match)
    assert s["exact_match"] == (text == CALL) and s["stopped"] and s["length"] == 7


def test_scores_of_a_turn_that_should_answer():
    exact = score("2 plus 3 is 5.", END, 9, ANSWERING, QWEN_FORMAT)
    assert exact["exact_match"] and exact["call_units"] == 0 and exact["tool_name_match"] is None
    assert not score("2 plus 3 is 6.", END, 9, ANSWERING, QWEN_FORMAT)["exact_match"]
    stray = score(CALL, END, 9, ANSWERING, QWEN_FORMAT)  # a call where none was expected still counts
    assert (stray["good_calls"], stray["call_units"]) == (1, 1)


def test_no_stop_token_is_neither_stopped_nor_exact():
    s = score(CALL, None, 32, CALLING, QWEN_FORMAT)  # the text is right, but the budget ran out
    assert not s["stopped"] and not s["exact_match"] and s["good_calls"] == 1


def test_aggregate():
    scores = [score(CALL, END, 4, CALLING, QWEN_FORMAT), score("no", None, 8, CALLING, QWEN_FORMAT),
              score("2 plus 3 is 5.", END, 6, ANSWERING, QWEN_FORMAT)]
    assert aggregate(scores) == {
        "val/tool_call_parse_rate": 0.5, "val/tool_name_match": 0.5, "val/exact_match": pytest.approx(2 / 3),
        "val/stop_rate": pytest.approx(2 / 3), "val/generation_length": 6.0,
    }
    assert math.isnan(aggregate([score("x", END, 1, ANSWERING, None)])["val/tool_call_parse_rate"])


def _tool_rows(n, seed=0):
    """Demo tool conversations (several tools, parallel calls, follow-ups); every other one ends at its first
    tool-call turn, so half the references call tools and half answer."""
    out = []
    for i, row in enumerate(rows(n, seed=seed, split="val")):
        if i % 2:
            first_call = next(j for j, m in enumerate(row["messages"]) if "tool_calls" in m)
            row = {**row, "messages": row["messages"][:first_call + 1]}
        out.append(row)
    return out


def _write(path, rows_):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return str(path)


def test_replaying_the_reference_scores_one(qwen_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    val = _tool_rows(12)
    cfg = load_config(None, [f"data.val_files={_write(tmp_path / 'val.jsonl', val)}", "trainer.val_generations=6",
                             "data.micro_batch_size_per_gpu=4"])
    validation = GenerationValidation(cfg, tok, None, None, tmp_path, log=lambda _: None)
    assert validation.format == QWEN_FORMAT and validation.rows_per_call == 4
    metrics = validation.evaluate(replay_generate(tok, [r["messages"] for r in val], TOOLS), step=3)
    assert {k: v for k, v in metrics.items() if k != "val/generation_seconds"} == {
        "val/tool_call_parse_rate": 1.0, "val/tool_name_match": 1.0, "val/exact_match": 1.0, "val/stop_rate": 1.0,
        "val/generation_length": pytest.approx(sum(len(tok.encode(p.reference)) for p in validation.prompts) / 6),
    }
    samples = [json.loads(line) for line in open(tmp_path / "samples" / "step_3.jsonl")]
    assert [s["where"] for s in samples] == [p.where for p in validation.prompts]
    assert all(s["generation"] == s["reference"] and s["exact_match"] for s in samples)
    assert any(s["calls"] for s in samples) and any(not s["calls"] for s in samples)
    # seeded: the same rows on every host and every run, and a different seed draws others
    again = GenerationValidation(cfg, tok, None, None, tmp_path, log=lambda _: None)
    assert again.prompts == validation.prompts
    other = load_config(None, [f"data.val_files={tmp_path / 'val.jsonl'}", "trainer.val_generations=6",
                               "trainer.seed=1"])
    assert GenerationValidation(other, tok, None, None, tmp_path, log=lambda _: None).prompts != validation.prompts


def test_stop_ids_come_from_the_template(qwen_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_trainer_reports_generation_metrics_and_writes_samples(sft_setup, tmp_path):
    """The tiny Qwen2 model with the demo's Qwen2.5-template tokenizer, under the 8-device mesh."""
    data = tmp_path / "data"
    data.mkdir()
    overrides = sft_overrides(sft_setup, tmp_path / "run", **{
        "data.train_files": _write(data / "train.jsonl", rows(8, split="train")),
        "data.val_files": _write(data / "val.jsonl", _tool_rows(6)), "data.max_length": 512,
        "trainer.total_training_steps": 2, "trainer.test_freq": 1, "trainer.val_generations": 4,
        "trainer.val_max_new_tokens": 8,
    })
    last = train(load_config(None, overrides))
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for step in (1, 2):
        samples = [json.loads(line) for line in open(run / "samples" / f"step_{step}.jsonl")]
        assert len(samples) == 4 and all(s["reference"].endswith("<|im_end|>") for s in samples)
        logged = {k: v for k, v in metrics[step - 1].items() if k in aggregate(samples)}
        assert logged == {k: None if math.isnan(v) else v for k, v in aggregate(samples).items()}  # NaN: null
    for name in ("tool_call_parse_rate", "tool_name_match", "exact_match", "stop_rate"):
        assert 0.0 <= last[f"val/{name}"] <= 1.0, name
    assert 1 <= last["val/generation_length"] <= 8


def test_two_processes_score_what_one_process_scores(sft_setup, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo) draw the same rows, generate under the shared mesh
    and report on every host the metrics and samples of one process with 8 devices."""
    val = _write(tmp_path / "val.jsonl", _tool_rows(8))
    worker = [sys.executable, str(Path(__file__).with_name("generation_worker.py")), sft_setup["model"],
              sft_setup["tokenizer"], val]
    single = tmp_path / "single"  # in this process, over its 8 devices
    cfg = load_config(None, [f"data.val_files={val}", *WORKER_KEYS])
    mesh = make_mesh({"fsdp": -1})
    model = jm.from_pretrained(sft_setup["model"], dtype="float32", mesh=mesh)
    tok = AutoTokenizer.from_pretrained(sft_setup["tokenizer"])
    metrics = GenerationValidation(cfg, tok, model, mesh, single, log=lambda _: None)(param_arrays(model), step=1)
    (single / "metrics_0.json").write_text(json.dumps({"devices": 8, **metrics}))
    multi = tmp_path / "multi"
    run_processes([[*worker, str(multi), json.dumps(WORKER_KEYS)]] * 2)

    def result(run, process):
        metrics = json.loads((run / f"metrics_{process}.json").read_text())
        metrics.pop("val/generation_seconds")
        return metrics

    assert result(multi, 0) == result(multi, 1) == result(single, 0)
    samples = (single / "samples" / "step_1.jsonl").read_text()
    assert (multi / "samples" / "step_1.jsonl").read_text() == samples and samples.count("\n") == 5


@pytest.mark.parametrize("overrides, fragment", [
    (["trainer.val_generations=4"], "set data.val_files"),
    (["trainer.val_generations=-1", "data.val_files=v.jsonl"], "trainer.val_generations >= 0"),
    (["trainer.val_max_new_tokens=0"], "trainer.val_max_new_tokens >= 1"),
    (["trainer.val_temperature=-0.5"], "trainer.val_temperature >= 0"),
])
def test_bad_generation_settings_fail_at_load(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_config(None, overrides)

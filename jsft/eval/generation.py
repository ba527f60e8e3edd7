"""Validation by generation: replay held-out prompts with the KV-cache sampler and score the protocol.

    held-out rows -> (prompt P_k, reference G_k) of each row's last trained assistant turn -> generate
    -> parse tool calls in the template's own format -> scores -> val/* metrics + samples/step_N.jsonl

Prompts and references come from the data pipeline's renderer (jsft/data/chat.py), so a prompt is exactly
the context the model is trained to continue and the reference is exactly its target. Rows are drawn by a
seeded shuffle of the validation files, so every host picks the same rows; the sampler runs under the
run's mesh and returns every row to every process, so every host computes the same metrics (process 0
writes the samples).

Metrics (each a mean over the prompts it applies to; NaN when it applies to none):
- val/tool_call_parse_rate  jsft/eval/tool_calls.py's definition: calls that parse in the template's format,
                            name a tool of the row's `tools` and fit its JSON schema / units; a call is
                            expected where the reference turn calls tools
- val/tool_name_match       prompts whose reference calls tools: the generated call names equal the
                            reference's, in order
- val/exact_match           the generation, stop token included, equals the reference turn
- val/stop_rate             generations that ended on a stop token within trainer.val_max_new_tokens
- val/generation_length     generated tokens per prompt (stop token included)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from jax.sharding import Mesh

from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.conversation import parse_row
from jsft.data.sources import BadRow, RowSource, resolve_files
from jsft.data.tokenizer import stop_token_ids
from jsft.eval.tool_calls import (FormatError, ToolCallFormat, call_units, check_calls, derive_format,
                                  tool_call_parse_rate)
from jsft.generate import Generator
from jsft.sharding import data_parallel_size


@dataclass(frozen=True)
class HeldOutPrompt:
    where: str  # file:line of the row
    prompt: str  # P_k: the rendered history with the generation prompt
    prompt_ids: list[int]
    reference: str  # G_k: the trained turn, ending with its end-of-turn token
    tools: Optional[list[dict]]  # the row's tools
    reference_calls: list[str]  # tool names the reference turn calls, in order


def held_out_prompts(data_cfg, tokenizer, n: int, seed: int) -> list[HeldOutPrompt]:
    """`n` prompts from data.val_files, drawn by a seeded shuffle; rows that are bad, train nothing or
    whose prompt exceeds data.max_length are passed over (the pipeline already reported them)."""
    source = RowSource(resolve_files(data_cfg.val_files))
    order = list(range(len(source)))
    random.Random(f"jsft.eval/{seed}").shuffle(order)  # a string seed does not depend on PYTHONHASHSEED
    options = ChatOptions.from_config(data_cfg)
    renderer = ChatRenderer(tokenizer, options)
    prompts = []
    for index in order:
        if len(prompts) == n:
            break
        row = source[index]
        if row.error is not None:
            continue
        try:
            conv = parse_row(row.record, options.keys, dict(options.template_kwargs))
            turns = renderer.rendered_turns(conv)
        except BadRow:
            continue
        if not turns:
            continue
        turn = turns[-1]
        ids = tokenizer.encode(turn.prompt, add_special_tokens=False)  # one pass, as an inference server does
        if len(ids) > data_cfg.max_length:
            continue
        message = [m for m in conv.messages if m["role"] == "assistant"][turn.number]
        calls = [c["function"]["name"] for c in message.get("tool_calls", [])]
        prompts.append(HeldOutPrompt(row.where, turn.prompt, ids, turn.generation, conv.tools, calls))
    return prompts


# ---- scoring (pure) ----------------------------------------------------------------------------------------------


def score(text: str, stop: Optional[str], length: int, prompt: HeldOutPrompt,
          fmt: Optional[ToolCallFormat]) -> dict:
    """Per-sample scores of one generation: `text` before its stop token, `stop` the stop token's text
    (None: the budget ran out first), `length` its tokens. `fmt` may be None where no row involves tools."""
    calls = check_calls(fmt.parse(text), prompt.tools) if fmt is not None else []
    names = [c.name for c in calls if c.name is not None]
    good, units = call_units(calls, expects_call=bool(prompt.reference_calls))
    return {
        "good_calls": good,
        "call_units": units,
        "tool_name_match": (names == prompt.reference_calls) if prompt.reference_calls else None,
        "exact_match": stop is not None and text + stop == prompt.reference,
        "stopped": stop is not None,
        "length": length,
        "calls": [{"name": c.name, "arguments": c.arguments, "error": c.error} for c in calls],
    }


def aggregate(scores: Sequence[dict]) -> dict[str, float]:
    """The val/* metrics of the module docstring from per-sample scores."""
    names = [s["tool_name_match"] for s in scores if s["tool_name_match"] is not None]
    return {
        "val/tool_call_parse_rate": tool_call_parse_rate((s["good_calls"], s["call_units"]) for s in scores),
        "val/tool_name_match": _mean(names),
        "val/exact_match": _mean([s["exact_match"] for s in scores]),
        "val/stop_rate": _mean([s["stopped"] for s in scores]),
        "val/generation_length": _mean([s["length"] for s in scores]),
    }


def _mean(values: Sequence) -> float:
    return sum(map(float, values)) / len(values) if values else math.nan


# ---- the validation hook ------------------------------------------------------------------------------------------

Generate = Callable[[Sequence[Sequence[int]]], Sequence[Sequence[int]]]


class GenerationValidation:
    """`(params, step) -> val/* metrics`, writing <run_dir>/samples/step_N.jsonl on process 0.

    Built once per run: the prompts are drawn and the tool-call format derived here, so a template whose
    format cannot be derived fails before training, not at the first validation. `model` is the decoder
    whose structure the sampler compiles and `mesh` the run's (None: one device)."""

    def __init__(self, cfg, tokenizer, model, mesh: Optional[Mesh], run_dir: Path,
                 log: Callable[[str], None] = print):
        t = cfg.trainer
        self.tokenizer, self.samples_dir = tokenizer, Path(run_dir) / "samples"
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.prompts = held_out_prompts(cfg.data, tokenizer, t.val_generations, seed=t.seed)
        if not self.prompts:
            raise ValueError(f"trainer.val_generations={t.val_generations}: no usable prompt in data.val_files "
                             f"(every row is bad, trains nothing or exceeds data.max_length)")
        self.format = self._format() if any(p.tools or p.reference_calls for p in self.prompts) else None
        self.generator = Generator(model, max_new_tokens=t.val_max_new_tokens, eos_ids=self.stop_ids,
                                   temperature=t.val_temperature, pad_id=tokenizer.pad_token_id or 0)
        self.seed = t.seed
        # one compiled program per prompt-length bucket: rows per call are what a training micro-batch holds
        self.rows_per_call = cfg.data.micro_batch_size_per_gpu * (data_parallel_size(mesh) if mesh else 1)
        calls = f"tool calls as {self.format.open.strip()!r}...{self.format.close.strip()!r}" if self.format else "no tools"
        log(f"validation by generation: {len(self.prompts)} held-out prompts, up to {t.val_max_new_tokens} new "
            f"tokens each, {calls}")

    def _format(self) -> ToolCallFormat:
        stops = [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stop_ids)]
        try:
            return derive_format(self.tokenizer, stops)
        except FormatError as e:
            raise ValueError(f"trainer.val_generations: cannot parse tool calls in this chat template's format: {e}; "
                             "fix data.chat_template or set trainer.val_generations=0") from None

    def __call__(self, params, step: int) -> dict:
        return self.evaluate(lambda prompts: self.generator(params, prompts, seed=self.seed + step), step)

    def evaluate(self, generate: Generate, step: int) -> dict:
        """Metrics of `generate` (token ids of the prompts -> new token ids) on the held-out prompts."""
        t0 = time.perf_counter()
        outputs = self.generate(generate)
        scores, records = [], []
        for prompt, ids in zip(self.prompts, outputs):
            text, stop = self._decode(ids)
            scores.append(score(text, stop, len(ids), prompt, self.format))
            records.append({"where": prompt.where, "prompt": prompt.prompt, "generation": text + (stop or ""),
                            "reference": prompt.reference, **scores[-1]})
        if jax.process_index() == 0:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            with open(self.samples_dir / f"step_{step}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return {**aggregate(scores), "val/generation_seconds": time.perf_counter() - t0}

    def generate(self, generate: Generate) -> list[list[int]]:
        """Every prompt's new tokens, shortest prompts first in calls of `rows_per_call` rows."""
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i].prompt_ids))
        out: list = [None] * len(order)
        for start in range(0, len(order), self.rows_per_call):
            chunk = order[start:start + self.rows_per_call]
            # a short last call is filled with copies, so every call of a bucket has one shape
            ids = [self.prompts[i].prompt_ids for i in chunk]
            tokens = generate(ids + [ids[-1]] * (self.rows_per_call - len(ids)))
            for i, row in zip(chunk, tokens):
                out[i] = [int(t) for t in row]
        return out

    def _decode(self, ids: Sequence[int]) -> tuple[str, Optional[str]]:
        """(text before the stop token, the stop token's text or None when the budget ran out)."""
        if ids and ids[-1] in self.stop_ids:
            return self._text(ids[:-1]), self._text(ids[-1:])
        return self._text(ids), None

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


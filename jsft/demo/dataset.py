"""Deterministic multi-turn tool-use SFT data with verifiable answers.

Flow: seeded rng -> Task (question, rounds of tool calls, final answer) -> OpenAI-style messages -> JSONL rows.
Tool results come from `tools.run_tool`, so every reference answer is what the tools really return. The language
is small and regular (a few question templates per operation, one answer form per task kind) so that a ~1-5M
parameter model trained from scratch for minutes can learn it; what varies is which tool, which numbers and which
countries, and the model must copy those from the question and the tool results.
"""

import hashlib
import json
import pathlib
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from jsft.demo.tools import COUNTRIES, FIELDS, OPS, TOOLS, run_tool, tool_response

SYSTEM_PROMPT = "You are a helpful assistant."
FOLLOW_UP_RATE = 0.2  # share of conversations where the user asks a second question after the first answer
HELD_OUT_BUCKETS = 8  # one task in 8, chosen by its tool calls, is reserved for validation

# Task kind -> sampling weight. Chains need the most practice: their second call copies a tool result.
KIND_WEIGHTS = {"single": 5, "parallel": 2, "chain": 3}

QUESTIONS = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "Compute {a} + {b}."),
    "sub": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {b} less than {a}?", "Compute {a} - {b}."),
    "mul": ("What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?",
            "Compute {a} * {b}."),
    "capital": ("What is the capital of {country}?", "Which city is the capital of {country}?",
                "Name the capital of {country}."),
    "population": ("What is the population of {country}?", "How many people live in {country}?",
                   "Look up the population of {country}."),
}
PARALLEL_QUESTIONS = ("What is {x}, and what is {y}?", "Tell me {x} and {y}.")
CHAIN_QUESTIONS = ("Take {x}, then {then}.", "Find {x} and then {then}.")
# How answers and compound questions name one call's result.
CLAUSES = {"add": "{a} plus {b}", "sub": "{a} minus {b}", "mul": "{a} times {b}",
           "capital": "the capital of {country}", "population": "the population of {country}"}
THEN = {"add": "add {b}", "sub": "subtract {b}", "mul": "multiply by {b}"}

Call = tuple[str, dict]  # (tool name, arguments)


@dataclass(frozen=True)
class Task:
    question: str
    rounds: tuple[tuple[Call, ...], ...]  # the calls of each assistant turn that calls tools, in order
    answer: str  # the final assistant message; it states the result exactly


class ValPrompt(NamedTuple):
    messages: list[dict]  # system + user: the conversation up to the first generation
    tools: list[dict]
    expected: str  # the reference final answer
    tool_rounds: int  # assistant turns that must call tools before the answer


class DatasetPaths(NamedTuple):
    train: pathlib.Path
    val: pathlib.Path


def write_dataset(out_dir, n_train: int, n_val: int, seed: int = 0) -> DatasetPaths:
    """Write `train.jsonl` and `val.jsonl` ({"messages", "tools"} per line); their tasks never overlap."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = DatasetPaths(out / "train.jsonl", out / "val.jsonl")
    for path, split, n in ((paths.train, "train", n_train), (paths.val, "val", n_val)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows(n, seed, split))
    return paths


def rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The first `n` rows of a split; row i of `val` is the conversation behind `val_prompts(...)[i]`."""
    return [{"messages": _messages(tasks), "tools": TOOLS} for tasks in _take(n, seed, split)]


def val_prompts(n: int, seed: int = 0) -> list[ValPrompt]:
    """Held-out prompts: the first question of each of the first `n` validation conversations."""
    system = {"role": "system", "content": SYSTEM_PROMPT}
    return [ValPrompt([system, _user(task.question)], TOOLS, task.answer, len(task.rounds))
            for task, *_ in _take(n, seed, "val")]


def _take(n: int, seed: int, split: str) -> list[list[Task]]:
    stream = _conversation_tasks(seed, split)
    return [next(stream) for _ in range(n)]


def _conversation_tasks(seed: int, split: str) -> Iterator[list[Task]]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    # A string seed is hashed with SHA-512 by `random`, so streams do not depend on PYTHONHASHSEED.
    rng = random.Random(f"jsft.demo/{seed}/{split}")
    while True:
        count = 2 if rng.random() < FOLLOW_UP_RATE else 1
        yield [_held_task(rng, split) for _ in range(count)]


def _held_task(rng: random.Random, split: str) -> Task:
    # Splitting by task content (not by row) keeps every validation task, in every phrasing, out of training.
    while True:
        task = _draw_task(rng)
        digest = hashlib.sha256(json.dumps(task.rounds).encode()).digest()
        if (int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0) == (split == "val"):
            return task


def _draw_task(rng: random.Random) -> Task:
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    return {"single": _single, "parallel": _parallel, "chain": _chain}[kind](rng)


def _single(rng: random.Random) -> Task:
    call = _any_call(rng)
    name, args = call
    key = args["op"] if name == "calculator" else args["field"]
    return Task(rng.choice(QUESTIONS[key]).format(**args), ((call,),), _capitalize(_statement(call)) + ".")


def _parallel(rng: random.Random) -> Task:
    first = _any_call(rng)
    second = _any_call(rng)
    while second == first:
        second = _any_call(rng)
    question = rng.choice(PARALLEL_QUESTIONS).format(x=_clause(first), y=_clause(second))
    answer = f"{_capitalize(_statement(first))}, and {_statement(second)}."
    return Task(question, ((first, second),), answer)


def _chain(rng: random.Random) -> Task:
    """Two rounds: the second call's first operand is the first call's result."""
    if rng.random() < 0.5:
        first = _calc_call(rng)
    else:
        first = ("lookup", {"country": rng.choice(list(COUNTRIES)), "field": "population"})
    value = run_tool(*first)
    op = rng.choice(list(OPS))
    # Subtracting at most `value` keeps every number in the data non-negative.
    b = rng.randint(0, value) if op == "sub" else rng.randint(1, 99)
    second = ("calculator", {"op": op, "a": value, "b": b})
    question = rng.choice(CHAIN_QUESTIONS).format(x=_clause(first), then=THEN[op].format(b=b))
    return Task(question, ((first,), (second,)), f"The answer is {run_tool(*second)}.")


def _any_call(rng: random.Random) -> Call:
    if rng.random() < 0.5:
        return _calc_call(rng)
    return ("lookup", {"country": rng.choice(list(COUNTRIES)), "field": rng.choice(FIELDS)})


def _calc_call(rng: random.Random) -> Call:
    op = rng.choice(list(OPS))
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "sub":
        a, b = max(a, b), min(a, b)
    return ("calculator", {"op": op, "a": a, "b": b})


def _clause(call: Call) -> str:
    name, args = call
    return CLAUSES[args["op"] if name == "calculator" else args["field"]].format(**args)


def _statement(call: Call) -> str:
    """'<clause> is <result>': the one answer form the model learns for a single result."""
    return f"{_clause(call)} is {run_tool(*call)}"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _messages(tasks: list[Task]) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for task in tasks:
        messages.append(_user(task.question))
        for calls in task.rounds:
            messages.append(assistant_tool_calls(calls))
            messages.extend(tool_message(name, run_tool(name, args)) for name, args in calls)
        messages.append({"role": "assistant", "content": task.answer})
    return messages


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant_tool_calls(calls, content: str = "") -> dict:
    """An assistant message calling `calls` [(name, arguments)], with arguments as JSON objects (not strings)."""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}
                           for name, args in calls]}


def tool_message(name: str, value) -> dict:
    return {"role": "tool", "name": name, "content": tool_response(value)}

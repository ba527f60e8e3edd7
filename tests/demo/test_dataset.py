import hashlib
import json

from jsft.demo.dataset import rows, val_prompts, write_dataset
from jsft.demo.protocol import checked_calls
from jsft.demo.tools import TOOLS, run_tool, tool_response


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    a = write_dataset(tmp_path / "a", n_train=200, n_val=20, seed=3)
    b = write_dataset(tmp_path / "b", n_train=200, n_val=20, seed=3)
    c = write_dataset(tmp_path / "c", n_train=200, n_val=20, seed=4)
    assert [_digest(p) for p in a] == [_digest(p) for p in b]
    assert _digest(a.train) != _digest(c.train)
    lines = a.train.read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[0]) == rows(1, seed=3)[0]


def _calls(message):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_every_row_follows_the_protocol_and_tool_results_are_real():
    for row in rows(300, seed=0) + rows(50, seed=0, split="val"):
        messages = row["messages"]
        assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
        assert messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]
        for i, message in enumerate(messages):
            if message.get("tool_calls"):
                calls = _calls(message)
                results = messages[i + 1:i + 1 + len(calls)]
                assert [r["content"] for r in results] == [tool_response(run_tool(*c)) for c in calls]
                body = "".join(f"<tool_call>{json.dumps({'name': n, 'arguments': a})}</tool_call>" for n, a in calls)
                assert all(call.error is None for call in checked_calls(body, TOOLS))


def test_the_mix_has_single_parallel_chained_and_follow_up_conversations():
    kinds = set()
    for row in rows(300, seed=0):
        call_turns = [m for m in row["messages"] if m.get("tool_calls")]
        users = [m for m in row["messages"] if m["role"] == "user"]
        kinds.add(max(len(m["tool_calls"]) for m in call_turns))
        kinds.add(f"{len(call_turns)} call turns" if len(users) == 1 else "follow-up")
    assert {1, 2, "1 call turns", "2 call turns", "follow-up"} <= kinds


def _task_keys(row):
    """One key per user question: the calls of every round that answers it."""
    keys = []
    for message in row["messages"]:
        if message["role"] == "user":
            keys.append([])
        elif message.get("tool_calls"):
            keys[-1].append(_calls(message))
    return [json.dumps(key) for key in keys]


def test_validation_tasks_never_appear_in_training():
    train = {key for row in rows(2000, seed=0) for key in _task_keys(row)}
    val = {key for row in rows(200, seed=0, split="val") for key in _task_keys(row)}
    assert len(val) > 150 and not train & val


def test_val_prompts_are_the_openings_of_the_val_rows():
    prompts = val_prompts(30, seed=0)
    for prompt, row in zip(prompts, rows(30, seed=0, split="val")):
        assert prompt.messages == row["messages"][:2] and prompt.tools == row["tools"]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant" and not m.get("tool_calls")]
        assert prompt.expected == answers[0]
        rounds = 0
        for message in row["messages"][2:]:
            if message["role"] == "assistant" and not message.get("tool_calls"):
                break
            rounds += bool(message.get("tool_calls"))
        assert prompt.tool_rounds == rounds
    assert {p.tool_rounds for p in prompts} == {1, 2}

import pytest

from jsft.demo.dataset import rows, val_prompts
from jsft.demo.episode import decode_generation, episode_metrics, replay_generate, run_episodes
from jsft.demo.tools import TOOLS

N = 40


@pytest.fixture(scope="module")
def prompts():
    return val_prompts(N, seed=0)


def _constant(tokenizer, text, eos=True):
    """A `generate` that always says `text`."""
    ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
    return lambda batch: [list(ids) for _ in batch]


def test_replaying_the_reference_scores_one(demo_tokenizer, prompts):
    conversations = [row["messages"] for row in rows(N, seed=0, split="val")]
    episodes = run_episodes(replay_generate(demo_tokenizer, conversations, TOOLS), demo_tokenizer, prompts)
    assert episode_metrics(episodes) == {"tool_call_parse_rate": 1.0, "exact_answer_rate": 1.0}
    assert all(e.correct and e.error is None for e in episodes)
    # The played conversation is the reference, up to the first answer.
    for episode, messages in zip(episodes, conversations):
        assert episode.messages == messages[:len(episode.messages)]
        assert len(episode.generations) == episode.tool_rounds + 1


def test_answering_without_calling_fails_both_rates(demo_tokenizer, prompts):
    episodes = run_episodes(_constant(demo_tokenizer, "The answer is 5."), demo_tokenizer, prompts)
    assert episode_metrics(episodes) == {"tool_call_parse_rate": 0.0, "exact_answer_rate": 0.0}
    assert all(e.final_answer == "The answer is 5." for e in episodes)


def test_a_malformed_call_ends_the_episode(demo_tokenizer, prompts):
    bad = '<tool_call>\n{"name": "calculator", "arguments": {"op": "pow", "a": 2, "b": 3}}\n</tool_call>'
    episodes = run_episodes(_constant(demo_tokenizer, bad), demo_tokenizer, prompts[:3])
    assert all("not one of" in e.error and e.final_answer is None for e in episodes)
    assert [len(e.generations) for e in episodes] == [1, 1, 1]


def test_a_model_that_keeps_calling_is_stopped(demo_tokenizer, prompts):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"op": "add", "a": 2, "b": 3}}\n</tool_call>'
    episodes = run_episodes(_constant(demo_tokenizer, call), demo_tokenizer, prompts[:2], max_turns=3)
    assert all(len(e.generations) == 3 and "no final answer" in e.error for e in episodes)
    assert episodes[0].messages[-1] == {"role": "tool", "name": "calculator", "content": '{"result": 5}'}
    # Calls beyond the reference's rounds still count when well formed.
    assert episode_metrics(episodes)["tool_call_parse_rate"] == 1.0


def test_decoding_stops_at_the_first_eos_or_pad(demo_tokenizer):
    ids = demo_tokenizer.encode("Hi.", add_special_tokens=False)
    tail = [demo_tokenizer.eos_token_id] + ids + [demo_tokenizer.pad_token_id]
    assert decode_generation(demo_tokenizer, ids + tail) == "Hi."
    assert decode_generation(demo_tokenizer, ids + [demo_tokenizer.pad_token_id]) == "Hi."


def test_generate_must_answer_every_prompt(demo_tokenizer, prompts):
    with pytest.raises(ValueError, match="returned 0 sequences"):
        run_episodes(lambda batch: [], demo_tokenizer, prompts[:2])

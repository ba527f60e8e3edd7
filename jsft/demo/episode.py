"""Validation episodes driven by any generation function: generate -> parse calls -> run tools -> ... -> answer.

Independent of JAX: `generate(prompts: list[list[int]]) -> list[list[int]]` may be the KV-cache sampler or a stub.
Episodes advance in lockstep so each turn is one batched `generate` call. After a turn with calls, the history is
re-rendered from the parsed calls with the chat template, as an OpenAI-style server would; for a model that
follows the protocol this equals its own tokens, because the template is prefix-preserving.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from jsft.demo.dataset import ValPrompt, assistant_tool_calls, tool_message
from jsft.demo.protocol import FORMAT, answer_matches, checked_calls, exact_answer_rate
from jsft.demo.tools import run_tool
from jsft.eval.tool_calls import call_units, tool_call_parse_rate

Generate = Callable[[list[list[int]]], Sequence[Sequence[int]]]
MAX_TURNS = 4  # the demo's tasks need at most 3 generations; the cap stops a model that keeps calling


@dataclass
class Episode:
    messages: list[dict]  # the conversation as played: prompt, parsed assistant turns, tool results
    tools: list[dict]
    expected: str
    tool_rounds: int
    generations: list[str] = field(default_factory=list)  # decoded model output of each turn, up to EOS
    final_answer: Optional[str] = None
    error: Optional[str] = None  # why the episode stopped without an answer
    done: bool = False

    @property
    def correct(self) -> bool:
        return answer_matches(self.final_answer, self.expected)

    def expects_call(self) -> list[bool]:
        """Per generation: did the reference call tools at this turn?"""
        return [turn < self.tool_rounds for turn in range(len(self.generations))]

    def record(self) -> dict:
        """A JSON-ready summary for samples files (tools left out: they are the same in every episode)."""
        return {"messages": self.messages, "generations": self.generations, "final_answer": self.final_answer,
                "expected": self.expected, "correct": self.correct, "error": self.error}


def run_episodes(generate: Generate, tokenizer, prompts: Sequence[ValPrompt], max_turns: int = MAX_TURNS
                 ) -> list[Episode]:
    """Play every prompt to a final answer, a malformed call, or `max_turns` generations."""
    episodes = [Episode(list(p.messages), p.tools, p.expected, p.tool_rounds) for p in prompts]
    for _ in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        outputs = generate([_prompt_ids(tokenizer, e) for e in active])
        if len(outputs) != len(active):
            raise ValueError(f"generate returned {len(outputs)} sequences for {len(active)} prompts")
        for episode, ids in zip(active, outputs):
            _advance(episode, decode_generation(tokenizer, ids))
    for episode in episodes:
        if not episode.done:
            episode.error, episode.done = f"no final answer after {max_turns} generations", True
    return episodes


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """`tool_call_parse_rate` over every generation (a call is expected where the reference made one) and
    `exact_answer_rate` over episodes."""
    units = [call_units(checked_calls(text, e.tools), expected)
             for e in episodes for text, expected in zip(e.generations, e.expects_call())]
    return {
        "tool_call_parse_rate": tool_call_parse_rate(units),
        "exact_answer_rate": exact_answer_rate([e.final_answer for e in episodes], [e.expected for e in episodes]),
    }


def decode_generation(tokenizer, ids: Sequence[int]) -> str:
    """The text before the first EOS or pad id; special tokens are kept so stray control tokens stay visible."""
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = [int(t) for t in ids]
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=False)


def _prompt_ids(tokenizer, episode: Episode) -> list[int]:
    text = tokenizer.apply_chat_template(episode.messages, tools=episode.tools, add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _advance(episode: Episode, text: str) -> None:
    episode.generations.append(text)
    calls = checked_calls(text, episode.tools)
    if not calls:
        episode.final_answer = text.strip()
        episode.messages.append({"role": "assistant", "content": episode.final_answer})
        episode.done = True
        return
    if errors := [call.error for call in calls if call.error]:
        episode.error, episode.done = errors[0], True
        return
    content = FORMAT.content(text).strip()
    episode.messages.append(assistant_tool_calls([(c.name, c.arguments) for c in calls], content))
    episode.messages.extend(tool_message(c.name, run_tool(c.name, c.arguments)) for c in calls)


def replay_generate(tokenizer, conversations: Sequence[Sequence[dict]], tools: Sequence[dict]) -> Generate:
    """A `generate` stub that answers each prompt with the reference turn that follows it in `conversations`.

    For tests of anything that drives a model (this module, a validation loop): with it every episode scores 1.0.
    """
    replies = {}
    for messages in conversations:
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = tokenizer.apply_chat_template(list(messages[:turn]), tools=list(tools),
                                                       add_generation_prompt=True, tokenize=False)
                full = tokenizer.apply_chat_template(list(messages[:turn + 1]), tools=list(tools), tokenize=False)
                # Prefix preservation makes the reference turn the text between the prompt and its EOS.
                replies[prompt] = full[len(prompt):full.index(tokenizer.eos_token, len(prompt))]

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        return [tokenizer.encode(replies[text], add_special_tokens=False) + [tokenizer.eos_token_id]
                for text in texts]

    return generate

"""Self-contained assets of the built-in demo job: tool-use data, a tokenizer trained on it, protocol checks.

Flow: `dataset` (tasks -> JSONL rows, held-out prompts) -> `tokenizer` (BPE + chat template trained on the
rendered rows) -> training (elsewhere) -> `episode` (play held-out prompts with a model's `generate`, using
`tools` to answer its calls) -> `protocol` (the demo's call format for `jsft.eval.tool_calls`, the answer rate).
"""

from jsft.demo.dataset import DatasetPaths, ValPrompt, rows, val_prompts, write_dataset
from jsft.demo.episode import Episode, episode_metrics, replay_generate, run_episodes
from jsft.demo.protocol import checked_calls, exact_answer_rate
from jsft.demo.tokenizer import CHAT_TEMPLATE, build_tokenizer, render
from jsft.demo.tools import TOOLS, run_tool

__all__ = [
    "CHAT_TEMPLATE", "DatasetPaths", "Episode", "TOOLS", "ValPrompt", "build_tokenizer", "checked_calls",
    "episode_metrics", "exact_answer_rate", "render", "replay_generate", "rows", "run_episodes", "run_tool",
    "val_prompts", "write_dataset",
]

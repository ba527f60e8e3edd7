"""Score exported demo models on the correct mask and on the tool-output tokens, to compare runs.

    python scripts/compare_masks.py RUN_DIR [RUN_DIR ...]

For each run directory of the demo job (its hf/ export and demo/ dataset), prints the token-mean loss of
the validation set on the assistant tokens (the correct targets) and on the tool-output tokens (what
`data.ablation_train_tool_outputs=true` also trains). A model that predicts tool outputs well has learned
to write tool results itself instead of waiting for them.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from jsft.config import load_config
from jsft.data.dataset import load_dataset
from jsft.data.tokenizer import load_tokenizer


def val_samples(run: Path, ablation: bool):
    demo = run / "demo"
    cfg = load_config(None, [f"data.val_files={demo / 'val.jsonl'}", f"data.tokenizer={demo / 'tokenizer'}",
                             "data.train_files=unused", "data.max_length=4096", "data.num_workers=0",
                             f"data.ablation_train_tool_outputs={str(ablation).lower()}"])
    dataset = load_dataset(cfg.data, load_tokenizer(cfg.data.tokenizer), cfg.data.val_files, progress=False)
    return [dataset.sample(i) for i in range(len(dataset))]


def token_nll(model, ids: np.ndarray) -> np.ndarray:
    """nll[t] of token t+1 given tokens <= t."""
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)[None]).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], dtype=torch.long), reduction="none").numpy()


def main(runs: list[str]) -> None:
    for run in map(Path, runs):
        model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
        right, wrong = val_samples(run, False), val_samples(run, True)
        sums = {"assistant": [0.0, 0], "tool outputs": [0.0, 0]}
        for (ids, correct), (_, ablated) in zip(right, wrong):
            nll = token_nll(model, ids)
            for name, w in (("assistant", correct[1:]), ("tool outputs", ablated[1:] & (1 - correct[1:]))):
                sums[name][0] += float((nll * w).sum())
                sums[name][1] += int(w.sum())
        print(f"{run}: " + ", ".join(f"{k} loss {s / max(n, 1):.4f} ({n} tokens)" for k, (s, n) in sums.items()))


if __name__ == "__main__":
    main(sys.argv[1:])

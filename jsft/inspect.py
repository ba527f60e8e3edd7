"""See exactly what jsft will train on.

    python -m jsft.inspect --data F [--data F2 ...] [--tokenizer D | --config C] [--show N] [--tokens]
                           [--dump OUT.jsonl] [data.key=value ...]

Builds the samples the trainer would build from the files (same options, same cache), prints the stop
tokens a generation ends on (and where they come from), the first N samples with their target tokens
highlighted (green on a terminal, `[...]` otherwise; `--tokens` lists them one token per line instead),
then the summary the trainer prints at start-up. `--dump` writes one JSON line per sample: input_ids,
loss_mask, source_index (0-based row across the files in order) and turn_index
(the assistant turn of a per-turn sample, null for a whole conversation). Bad input exits with status 1
and names the file and row. The tokenizer is --tokenizer, else data.tokenizer, else model.path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from jsft.config import load_config
from jsft.data.dataset import TokenizedDataset, load_dataset
from jsft.data.summary import format_summary
from jsft.data.tokenizer import describe_stop_tokens
from jsft.train.setup import run_tokenizer

_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsft.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help="a JSONL/Parquet/.arrow file, datasets.save_to_disk dir or glob; repeatable (default: data.train_files)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: data.tokenizer, then model.path)")
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--show", type=int, default=1, help="samples to print (default 1)")
    parser.add_argument("--tokens", action="store_true", help="print the shown samples one token per line")
    parser.add_argument("--dump", help="write every sample as a JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_length=4096")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tokenizer = run_tokenizer(cfg, args.tokenizer)  # as the trainer's set-up loads it
        dataset = load_dataset(cfg.data, tokenizer, args.data or cfg.data.train_files)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe_stop_tokens(tokenizer))
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    for i in range(min(args.show, len(dataset))):
        print(_header(dataset, i))
        print(_tokens(tokenizer, dataset, i) if args.tokens else _text(tokenizer, dataset, i, color))
        print()
    print(format_summary(dataset))
    if args.dump:
        _dump(dataset, args.dump)
        print(f"wrote {len(dataset):,} samples to {args.dump}")
    return 0


def _header(dataset: TokenizedDataset, i: int) -> str:
    source = int(dataset.source_index[i])
    turn = f", assistant turn {dataset.turn_index[i]}" if dataset.turn_index[i] >= 0 else ""
    mismatch = f", one-pass tokenization differs at token {dataset.mismatch[i]}" if dataset.mismatch[i] >= 0 else ""
    return (
        f"=== sample {i}: {dataset.locations(source)} (source_index {source}{turn}), "
        f"{dataset.lengths[i]:,} tokens, {dataset.targets[i]:,} targets{mismatch}"
    )


def _text(tokenizer, dataset: TokenizedDataset, i: int, color: bool) -> str:
    """The sample's text, each run of target tokens decoded as one piece and highlighted."""
    ids, mask = dataset.sample(i)
    out = []
    for target, run in itertools.groupby(range(len(ids)), key=lambda t: mask[t]):
        text = tokenizer.decode(ids[list(run)])
        out.append((f"{_GREEN}{text}{_RESET}" if color else f"[{text}]") if target else text)
    return "".join(out)


def _tokens(tokenizer, dataset: TokenizedDataset, i: int) -> str:
    ids, mask = dataset.sample(i)
    return "\n".join(f"{t:6d} {tok:8d} {'T' if m else '.'} {tokenizer.decode([tok])!r}" for t, (tok, m) in enumerate(zip(ids, mask)))


def _dump(dataset: TokenizedDataset, path: str) -> None:
    with open(path, "w") as f:
        for i in range(len(dataset)):
            ids, mask = dataset.sample(i)
            turn = int(dataset.turn_index[i])
            row = {"input_ids": ids.tolist(), "loss_mask": mask.tolist(), "source_index": int(dataset.source_index[i]), "turn_index": turn if turn >= 0 else None}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())

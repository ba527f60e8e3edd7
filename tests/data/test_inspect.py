"""`python -m jsft.inspect`: shown samples, summary, dump, errors."""

import json

from jsft.inspect import main

from .helpers import chat, write_jsonl


def test_inspect_shows_dumps_and_summarizes(tmp_path, qwen_tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(2), {"prompt": "p", "response": "r"}, "{bad"])
    dump = tmp_path / "out.jsonl"
    args = ["--data", path, "--tokenizer", str(qwen_tokenizer_dir), "--show", "1", "--dump", str(dump)]
    rc = main(args + [f"data.cache_dir={tmp_path / 'cache'}", "data.on_bad_row=skip"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"=== sample 0: {path}:1 (source_index 0), " in out and "sample 1" not in out
    assert "<|im_start|>assistant\n[answer 0<|im_end|>]\n<|im_start|>user" in out
    assert "data: 3 rows from 1 file(s) -> 2 samples" in out and f"{path}:3: invalid JSON" in out
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(r["source_index"], r["turn_index"]) for r in rows] == [(0, None), (1, None)]
    assert all(len(r["input_ids"]) == len(r["loss_mask"]) for r in rows) and sum(rows[1]["loss_mask"]) == 2

    assert main(args[:-2] + ["--show", "1", "--tokens", f"data.cache_dir={tmp_path / 'cache'}", "data.on_bad_row=skip"]) == 0
    assert "T '<|im_end|>'" in capsys.readouterr().out


def test_inspect_reports_bad_rows_and_bad_keys(tmp_path, qwen_tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(1), "{bad"])
    assert main(["--data", path, f"data.cache_dir={tmp_path / 'cache'}", "--tokenizer", str(qwen_tokenizer_dir)]) == 1
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err
    assert main(["--data", path, "--tokenizer", str(qwen_tokenizer_dir), "data.max_lenght=5"]) == 1
    assert "did you mean data.max_length" in capsys.readouterr().err

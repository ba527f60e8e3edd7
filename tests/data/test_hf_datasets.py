"""Hugging Face datasets on disk (save_to_disk directories, .arrow files) read as the JSON rows they were
written from; errors name the path and the fix; reading is batched; a save_to_disk dataset trains."""

import json
import pickle
import re
import sys

import numpy as np
import pytest

from jsft.config import load_config
from jsft.data.dataset import DataError, load_dataset
from jsft.data.sources import RowSource, resolve_files
from jsft.data.tokenizer import load_tokenizer
from jsft.train.loop import train
from jsft_testing import losses, sft_overrides

from .helpers import config, tool_call, write_jsonl
from .tool_rows import ROWS, all_samples, build_tokenizer, python_bytes, user, without_null_fields

datasets = pytest.importorskip("datasets")  # in the `test` extra; at run time only these inputs need it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def save_to_disk(path, rows, **kwargs) -> str:
    datasets.Dataset.from_list(rows, **kwargs).save_to_disk(str(path), num_shards=2)
    return str(path)


def test_save_to_disk_dataset_gives_the_json_rows_samples(tmp_path, built):
    directory = save_to_disk(tmp_path / "ds", ROWS)
    expected = all_samples(load_dataset(config(tmp_path), built, write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    assert all_samples(load_dataset(config(tmp_path), built, directory)) == expected
    shards = sorted(str(p) for p in (tmp_path / "ds").glob("*.arrow"))
    assert len(shards) == 2 and all_samples(load_dataset(config(tmp_path), built, shards)) == expected
    source = RowSource(resolve_files(directory))
    assert [row.record for row in source] == [without_null_fields(r) for r in ROWS]
    copy = pickle.loads(pickle.dumps(source))  # as it reaches the tokenization workers: reopened there
    assert copy[3].where == f"{directory} row 3 (0-based)" and copy[3].record == source[3].record


def test_json_feature_keeps_its_nulls(tmp_path, built):
    """`datasets.Json` (mixed argument types) stores per-row JSON: its nulls are the row's and are kept."""
    if not hasattr(datasets, "Json"):
        pytest.skip("this datasets version has no Json feature")
    rows = [{"messages": [user("u"), {"role": "assistant", "content": None, "tool_calls": [tool_call("f", args)]}]}
            for args in ({"x": 1, "y": None}, {"x": "a"})]
    directory = save_to_disk(tmp_path / "json", rows, on_mixed_types="use_json")
    assert [row.record for row in RowSource([directory])] == rows
    expected = all_samples(load_dataset(config(tmp_path), built, write_jsonl(tmp_path / "j.jsonl", rows)))
    assert all_samples(load_dataset(config(tmp_path), built, directory)) == expected


def test_hf_dataset_errors_name_the_path_and_the_fix(tmp_path, built, sft_setup, monkeypatch):
    rows = [ROWS[4], {"messages": [user("u"), {"role": "bot", "content": "x"}]}]
    directory = save_to_disk(tmp_path / "bad", rows)
    with pytest.raises(DataError, match=rf"{re.escape(directory)} row 1 \(0-based\): messages\[1\] has unknown role 'bot'"):
        load_dataset(config(tmp_path), built, directory)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    splits = re.escape(f"dd is a DatasetDict with splits train, test; name one split's directory, e.g. {tmp_path}/dd/train")
    with pytest.raises(ValueError, match=splits):
        load_dataset(config(tmp_path), built, str(tmp_path / "dd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a datasets.save_to_disk directory"):
        load_dataset(config(tmp_path), built, str(tmp_path / "empty"))
    (tmp_path / "x.arrow").write_text("not arrow")
    with pytest.raises(ValueError, match="x.arrow: not an Arrow file written by datasets"):
        load_dataset(config(tmp_path), built, str(tmp_path / "x.arrow"))
    # the trainer refuses it before tokenizing anything
    overrides = sft_overrides(sft_setup, tmp_path / "run", **{"data.val_files": str(tmp_path / "dd"), "data.cache_dir": str(tmp_path / "c")})
    with pytest.raises(ValueError, match=splits):
        train(load_config(None, overrides))
    assert not (tmp_path / "c").exists()
    # without the optional package: one line naming the fix, before any reading
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install datasets"):
        resolve_files([write_jsonl(tmp_path / "ok.jsonl", ROWS), directory])


def test_hf_dataset_is_read_a_batch_at_a_time(tmp_path):
    n = 20_000
    directory = str(tmp_path / "big")
    datasets.Dataset.from_dict({"messages": [[user(f"question {i} " * 4)] for i in range(n)]}).save_to_disk(directory)
    source = RowSource([directory])
    whole = python_bytes(lambda: datasets.load_from_disk(directory).to_list())
    held = python_bytes(lambda: [source[i] for i in (0, 1, n // 2, n - 1)])
    assert held < whole / 20, (held, whole)


def test_a_save_to_disk_dataset_trains(sft_setup, tmp_path):
    rows = [json.loads(line) for line in open(sft_setup["train"])]
    directory = save_to_disk(tmp_path / "train", rows)
    cfg = load_config(None, sft_overrides(sft_setup, tmp_path / "run", **{"data.train_files": directory, "trainer.total_training_steps": 2, "trainer.shape_buckets": 1}))
    tokenizer = load_tokenizer(sft_setup["tokenizer"])
    assert all_samples(load_dataset(cfg.data, tokenizer)) == all_samples(load_dataset(cfg.data, tokenizer, sft_setup["train"]))
    train(cfg)
    steps = losses(tmp_path / "run")
    assert list(steps) == [1, 2] and all(np.isfinite(v) and v > 0 for v in steps.values())


"""Tokenization split over hosts: the parts that processes p::count write merge into exactly the cache a
single process writes (samples, bad-row report, counts). The 2-process run is in tests/train/test_hosts.py."""

import json

import numpy as np

from jsft.data import dataset as dataset_module
from jsft.data.chat import ChatOptions, ChatRenderer
from jsft.data.sources import RowSource

from .helpers import chat, config, write_jsonl


def _cache(directory):
    meta = json.loads((directory / "meta.json").read_text())
    cols = dict(np.load(directory / "samples.npz"))
    ids = np.fromfile(directory / "input_ids.bin", np.int32)
    mask = np.fromfile(directory / "loss_mask.bin", np.uint8)
    return meta, cols, ids, mask


def test_merged_parts_equal_the_single_process_cache(tmp_path, qwen):
    # multi-turn rows split into several samples (multiturn_policy=split), rows without a trained turn,
    # and bad rows, so that rows contribute 0, 1 or several samples
    rows = []
    for i in range(23):
        rows.append(chat(1 + i % 3, prefix=f"r{i} "))
        if i % 5 == 2:
            rows.append("{not json")
        if i % 7 == 3:
            rows.append({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "train": False}]})
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config(tmp_path, multiturn_policy="split", on_bad_row="skip")
    renderer = ChatRenderer(qwen, ChatOptions.from_config(cfg))
    source = RowSource([path])

    single = tmp_path / "single"
    dataset_module._write_cache(single, source, dataset_module._tokenize(source, renderer, 0, False))
    for count in (2, 3):
        parts = [tmp_path / f"parts{count}" / str(p) for p in range(count)]
        for p, part in enumerate(parts):
            rows_p = slice(p, None, count)
            results = dataset_module._tokenize(source, renderer, 0, False, rows_p)
            dataset_module._write_cache(part, source, results, range(len(source))[rows_p])
        merged = tmp_path / f"merged{count}"
        dataset_module._merge_parts(merged, source, parts)
        (meta_a, cols_a, ids_a, mask_a), (meta_b, cols_b, ids_b, mask_b) = _cache(single), _cache(merged)
        assert meta_b == meta_a and meta_a["bad_rows"] and meta_a["zero_target_rows"] and meta_a["split_conversations"]
        assert cols_a.keys() == cols_b.keys()
        for k in cols_a:
            np.testing.assert_array_equal(cols_b[k], cols_a[k], err_msg=k)
        np.testing.assert_array_equal(ids_b, ids_a)
        np.testing.assert_array_equal(mask_b, mask_a)


def test_a_host_that_cannot_see_the_other_parts_tokenizes_everything(tmp_path, qwen, monkeypatch, capsys):
    """One process standing in for a host whose data.cache_dir is not shared: the other host's part never
    appears, so it warns and tokenizes all rows itself, with the same result as a single process."""
    from jsft import distributed
    from jsft.data.dataset import load_dataset

    monkeypatch.setattr(distributed, "SHARED_FS_WAIT_S", 0.2)
    path = write_jsonl(tmp_path / "rows.jsonl", [chat(1 + i % 3, prefix=f"r{i} ") for i in range(9)] + ["{not json"])
    single = load_dataset(config(tmp_path / "a", on_bad_row="skip"), qwen, path, progress=False)
    for index in (0, 1):
        alone = load_dataset(config(tmp_path / f"host{index}", on_bad_row="skip"), qwen, path, progress=False,
                             process_index=index, process_count=2)
        assert "cannot see the tokenization cache" in capsys.readouterr().err
        np.testing.assert_array_equal(alone.lengths, single.lengths)
        np.testing.assert_array_equal(np.asarray(alone.input_ids), np.asarray(single.input_ids))
        assert [str(b) for b in alone.stats.skipped] == [str(b) for b in single.stats.skipped]

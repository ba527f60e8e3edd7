"""The data fingerprint: what makes it differ, and the message every host raises (one process here,
the other host simulated; the real 2-process run is in tests/train/test_hosts.py)."""

import numpy as np
import pytest

from jsft import distributed
from jsft.data import fingerprint
from jsft.data.tokenizer import load_tokenizer

from .helpers import chat, config, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(sft_setup):
    return load_tokenizer(sft_setup["tokenizer"])


def test_inputs_change_with_file_size_options_and_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(1), chat(2, prefix="a")])
    base = fingerprint.inputs(config(tmp_path, train_files=path), tokenizer)
    assert fingerprint.inputs(config(tmp_path / "other_cache", train_files=path, num_workers=4), tokenizer) == base
    write_jsonl(tmp_path / "a.jsonl", [chat(1), chat(3)])
    assert fingerprint.inputs(config(tmp_path, train_files=path), tokenizer)["train files"] != base["train files"]
    write_jsonl(tmp_path / "a.jsonl", [chat(1), chat(2, prefix="b")])  # same size, other content
    resized = fingerprint.inputs(config(tmp_path, train_files=path), tokenizer)["train files"]
    assert resized.split(" bytes")[0] == base["train files"].split(" bytes")[0] and resized != base["train files"]
    changed = fingerprint.inputs(config(tmp_path, train_files=path, max_length=17), tokenizer)
    assert changed["data.max_length"] == "17" != base["data.max_length"]
    tokenizer.chat_template, saved = "{{ messages }}", tokenizer.chat_template
    try:
        assert fingerprint.inputs(config(tmp_path, train_files=path), tokenizer)["chat template"] != base["chat template"]
    finally:
        tokenizer.chat_template = saved


def test_a_differing_part_is_named_with_every_host_value(monkeypatch):
    mine = {"train files": "t.jsonl (100 bytes)", "data.max_length": "256", "tokenizer": "x"}
    other = {**mine, "data.max_length": "512"}
    replies = iter([fingerprint._vector(other), fingerprint._encode("512")])
    monkeypatch.setattr(distributed, "all_hosts", lambda v: np.stack([np.asarray(v, np.int32), next(replies)]))
    with pytest.raises(fingerprint.HostMismatch) as e:
        fingerprint.check_hosts_agree(mine)
    message = str(e.value)
    assert "data.max_length: process 0: 256; process 1: 512" in message
    assert "train files" not in message and "before step 1" in message
    assert next(replies, None) is None  # one exchange of hashes, then only the differing part's text


def test_agreeing_hosts_pass_after_one_exchange_of_hashes(monkeypatch):
    """Three hosts with the same parts, one of them holding them in another order: no error, and only the
    fixed-size hash vector (the part count, one hash per part) crosses hosts, no text."""
    parts = {"train files": "t.jsonl (100 bytes)", "data.max_length": "256", "tokenizer": "x"}
    reordered = fingerprint._vector(dict(reversed(parts.items())))
    sent = []

    def all_hosts(v):
        sent.append(list(v))
        return np.stack([np.asarray(v, np.int32), np.asarray(reordered, np.int32), np.asarray(v, np.int32)])

    monkeypatch.setattr(distributed, "all_hosts", all_hosts)
    assert fingerprint.check_hosts_agree(parts) is None
    assert len(sent) == 1 and len(sent[0]) == 1 + len(parts) and sent[0][0] == len(parts)


def test_a_missing_file_is_a_part_not_an_error(tmp_path, tokenizer):
    parts = fingerprint.inputs(config(tmp_path, train_files=str(tmp_path / "absent.jsonl")), tokenizer)
    assert parts["train files"].startswith("not readable: data file not found")

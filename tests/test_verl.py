"""A veRL user's scripts and data: every veRL SFT key has a fate, veRL's data layouts read as veRL reads them,
veRL's own example scripts (copies in tests/verl_scripts/, entry point and model path changed) train and exit 0,
and the "never train the wrong thing silently" cases stop with their message, having trained nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jsft import verl
from jsft.config import RunConfig, _valid_keys, load_config
from jsft.train.__main__ import main

from jsft_testing import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "verl_scripts"
KEYS = Path(__file__).parent / "data" / "verl_sft_config_keys.txt"
QUESTIONS = ["what is two plus three", "a red stone and a blue stone make how many", "seven minus three",
             "how many moons", "the river has three stones and seven more", "sun and moon count"]


# ---- the table -----------------------------------------------------------------------------------------------


def test_every_verl_sft_key_has_a_fate():
    keys = [k.strip() for k in KEYS.read_text().splitlines() if k.strip() and not k.startswith("#")]
    assert len(keys) > 150
    missing = [k for k in keys if verl.rule_for(k) is None]
    assert not missing
    # mapped rows name a real jsft key
    valid = set(_valid_keys(RunConfig))
    for rule in verl.RULES:
        if rule.fate == verl.MAPPED:
            assert rule.to in valid or rule.to.startswith("trainer.mesh."), rule


def test_docs_table_is_generated_from_the_code():
    assert (ROOT / "docs" / "verl.md").read_text() == verl.markdown(), \
        "regenerate: python -m jsft.verl --markdown > docs/verl.md"


def test_translation_of_verl_spellings(tmp_path):
    notes = []
    cfg = load_config(None, [
        "model.partial_pretrain=/m", "+data.response_dict_keys=[answer]", "data.prompt_dict_keys=[question]",
        "trainer.logger=console", "use_remove_padding=true", "model.fsdp_config.model_dtype=bf16",
        "engine.dtype=fp16", "trainer.test_freq=after_each_epoch", "optim.lr=1e-4", "optim.min_lr=1e-6",
        "trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "optim.warmup_style=constant",
        "data.multiturn.messages_key=conv", "model.fsdp_config.cpu_offload=true", "engine.fsdp_size=2",
        "++trainer.logger=['console','file']",
    ], notes)
    assert cfg.model.path == "/m" and cfg.model.param_dtype == "bfloat16" and cfg.model.dtype == "float16"
    assert cfg.data.prompt_dict_keys == ["question"] and cfg.data.response_dict_keys == ["answer"]
    assert cfg.trainer.logger == ["console"] and cfg.trainer.test_freq == "after_each_epoch"
    assert cfg.optim.min_lr_ratio == pytest.approx(0.01) and cfg.optim.lr_scheduler_type == "constant"
    assert cfg.trainer.export_hf and cfg.data.messages_key == "conv" and cfg.optim.offload_state
    assert dict(cfg.trainer.mesh) == {"fsdp": 2, "data": -1}
    assert any(n.startswith("use_remove_padding=True ignored") for n in notes)
    # veRL's defaults with model.path, and its run directory
    assert (cfg.data.train_batch_size, cfg.trainer.total_epochs, cfg.data.prompt_key) == (256, 4, "question")
    assert cfg.trainer.default_local_dir == "checkpoints/gsm8k-sft/test"


@pytest.mark.parametrize("override, message", [
    ("data.custom_cls.path=my.py", "custom torch Dataset"),
    ("engine=megatron", "use engine=fsdp"),
    ("model.external_lib=foo", "cannot run them"),
    ("optim.optimizer=AdamW8bit", "set optim.optimizer=AdamW"),
    ("model.override_config={attention_dropout: 0.1}", "edit a copy"),
])
def test_refused_keys_say_why_and_what_to_do(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model.path=/m", override])


def test_refused_keys_pass_at_their_harmless_value():
    cfg = load_config(None, ["model.path=/m", "data.custom_cls.path=null", "engine=fsdp", "optim=fsdp",
                             "model.override_config={}"])
    assert cfg.model.path == "/m"


def test_cluster_keys_are_checked():
    verl.check_cluster(1, 8, "cpu", 1, 8, "cpu")
    with pytest.raises(ValueError, match="trainer.nnodes=2 but jax runs 1 process"):
        verl.check_cluster(2, None, None, 1, 8, "cpu")
    with pytest.raises(ValueError, match="set trainer.n_gpus_per_node=8"):
        verl.check_cluster(None, 4, None, 1, 8, "cpu")
    with pytest.raises(ValueError, match="trainer.device=cuda but jax runs on cpu"):
        verl.check_cluster(None, None, "cuda", 1, 8, "cpu")


# ---- veRL's data layouts ---------------------------------------------------------------------------------------


def write_gsm8k(path: Path, n: int) -> None:
    """veRL's examples/data_preprocess/gsm8k.py layout: the text sits in the nested extra_info column."""
    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": q + " Let's think step by step"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i)},
             "extra_info": {"split": "train", "index": i, "answer": f"{q} is {i}. #### {i}", "question": q}}
            for i, q in ((i, QUESTIONS[i % len(QUESTIONS)]) for i in range(n))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_messages(path: Path, n: int, gsm8k: bool = False) -> None:
    """veRL's multiturn.py / gsm8k_multiturn_sft.py layout: a `messages` list column."""
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"{q} is {i}."}]
        if not gsm8k:
            msgs = [{"role": "system", "content": "You are a helpful assistant."}, *msgs,
                    {"role": "user", "content": "and twice that"}, {"role": "assistant", "content": f"{2 * i}."}]
        rows.append({"messages": msgs})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def verl_home(tmp_path_factory):
    """A HOME as veRL's scripts expect it: ~/data/{gsm8k,gsm8k_sft,multiturn} and ~/models/Qwen/... (tiny)."""
    from jsft.demo import build_tokenizer

    home = tmp_path_factory.mktemp("home")
    model = home / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct"
    make_tiny_hf(model, "qwen2", vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    build_tokenizer(model)  # the demo's Qwen-style tokenizer, saved next to the weights
    (home / "models" / "Qwen" / "Qwen2.5-0.5B").symlink_to(model)  # the engine script's base model
    for split, n in (("train", 32), ("test", 8)):
        write_gsm8k(home / "data" / "gsm8k" / f"{split}.parquet", n)
        write_messages(home / "data" / "gsm8k_sft" / f"{split}.parquet", n, gsm8k=True)
        write_messages(home / "data" / "multiturn" / f"{split}.parquet", n)
    return home


def test_nested_extra_info_columns_read_as_plain_ones(verl_home, tmp_path):
    from jsft.data.dataset import load_dataset
    from jsft.data.tokenizer import load_tokenizer

    model = verl_home / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct"
    plain = tmp_path / "plain.jsonl"
    table = pq.read_table(verl_home / "data" / "gsm8k" / "train.parquet").to_pylist()
    plain.write_text("".join(json.dumps({"question": r["extra_info"]["question"], "answer": r["extra_info"]["answer"]})
                             + "\n" for r in table))
    tok = load_tokenizer(str(model))
    common = ["model.path=" + str(model), "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"]
    nested = load_config(None, common + ["data.prompt_key=extra_info", "data.response_key=extra_info",
                                         "data.prompt_dict_keys=[question]", "+data.response_dict_keys=[answer]",
                                         "data.train_max_samples=20"]).data
    flat = load_config(None, common).data  # veRL's defaults: prompt_key question, response_key answer
    a = load_dataset(nested, tok, str(verl_home / "data" / "gsm8k" / "train.parquet"), max_rows=20)
    b = load_dataset(flat, tok, str(plain))
    assert len(a) == 20 and len(b) == 32
    for i in range(20):
        assert [x.tolist() for x in a.sample(i)] == [x.tolist() for x in b.sample(i)]


def test_a_missing_column_is_named_once_with_the_columns_found(verl_home, tmp_path):
    from jsft.data.dataset import DataError, load_dataset
    from jsft.data.tokenizer import load_tokenizer

    model = verl_home / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct"
    cfg = load_config(None, ["model.path=" + str(model), "data.num_workers=0", f"data.cache_dir={tmp_path}"]).data
    with pytest.raises(DataError) as e:
        load_dataset(cfg, load_tokenizer(str(model)), str(verl_home / "data" / "gsm8k" / "train.parquet"))
    message = str(e.value)
    assert "nor 'question' and 'answer'" in message and "extra_info" in message and "data.prompt_key" in message
    assert message.count("\n") == 0  # one line, not one per row
    assert not any(tmp_path.iterdir())  # nothing tokenized


def test_apply_chat_template_kwargs_reach_the_template(tmp_path):
    from jsft.data.chat import ChatOptions, ChatRenderer
    from jsft.data.conversation import parse_row
    from jsft.data.tokenizer import load_tokenizer
    from jsft.demo import build_tokenizer

    tok = load_tokenizer(str(build_tokenizer(tmp_path / "tok")))
    tok.chat_template = tok.chat_template.replace("{%- if tools %}", "{{- greeting or '' }}{%- if tools %}", 1)
    cfg = load_config(None, ["model.path=/m", "data.apply_chat_template_kwargs={greeting: HELLO}"]).data
    options = ChatOptions.from_config(cfg)
    conv = parse_row({"question": "hi", "answer": "yo"}, options.keys, dict(options.template_kwargs))
    turn = ChatRenderer(tok, options).rendered_turns(conv)[0]
    assert turn.prompt.startswith("HELLO")


# ---- veRL's own scripts ----------------------------------------------------------------------------------------

# sizes appended to each script's arguments (its `$@`): tiny batches, one or two steps
SIZES = ["data.train_batch_size=8", "data.max_length=128", "trainer.total_training_steps=1", "data.num_workers=0",
         "model.dtype=float32", "model.remat_policy=none"]


def run_script(script: str, home: Path, *args: str, env: dict = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=environment, capture_output=True, text=True,
                          timeout=900, cwd=home)


@pytest.mark.parametrize("script, extra, shown", [
    # legacy fsdp_sft_trainer, gsm8k with nested extra_info columns and LoRA
    ("gsm8k_run_qwen_05_peft.sh", ["data.micro_batch_size_per_gpu=1"], "rank 32, alpha 16 on all-linear"),
    # legacy, gsm8k, Ulysses 2 and liger (ignored: the loss is chunked)
    ("gsm8k_run_qwen_05_sp2_liger.sh", [], "model.use_liger=True ignored"),
    # legacy multi-turn messages with Ulysses 2
    ("multiturn_run_qwen_05_sp2.sh", [], "each row split over 2 devices"),
    # current sft_trainer, engine=fsdp, optim=fsdp, dynamic batches, logger console+file
    ("run_sft_engine.sh", ["data.max_token_len_per_gpu=256", "trainer.total_training_steps=2"],
     "removing the earlier run's checkpoints [7]"),
])
def test_verl_example_script_trains(verl_home, script, extra, shown):
    save = verl_home / "runs" / script
    args = [] if script == "run_sft_engine.sh" else ["8", str(save)]
    if script == "run_sft_engine.sh":  # its RESUME_MODE=disable starts over in a directory of another run
        (save / "checkpoints" / "7").mkdir(parents=True)
        (save / "identity.json").write_text(json.dumps({"model": {"path": "/elsewhere"}}))
    proc = run_script(script, verl_home, *args, *SIZES, f"data.cache_dir={verl_home / 'cache'}", *extra,
                      env={"ckpts_home": str(save)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["train/target_tokens"] > 0
    assert "veRL key:" in proc.stdout and shown in proc.stdout  # the notes and the summary say what runs
    steps = sorted(int(p.name) for p in (save / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [metrics[-1]["step"]]  # the run's own last step; an earlier run's checkpoints are gone


# ---- never train the wrong thing silently ---------------------------------------------------------------------


def test_train_files_without_a_model_is_an_error(verl_home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main([f"data.train_files={verl_home / 'data' / 'gsm8k' / 'train.parquet'}"])
    assert rc == 2
    assert "no model is named: set model.path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no demo run, no run directory


def test_a_logger_whose_package_is_missing_is_refused(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    rc = main(["model.path=/m", "trainer.logger=['console','wandb']"])
    assert rc == 2
    assert "the wandb package is not installed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resuming_another_runs_directory_stops_before_any_work(verl_home, tmp_path, capsys):
    model = verl_home / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct"
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text((model / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    from jsft.config import load_config as load
    from jsft.train import run_identity

    first = load(None, [f"model.path={other}", f"data.train_files={verl_home / 'data' / 'gsm8k_sft' / 'train.parquet'}",
                        f"trainer.default_local_dir={run}"])
    run_identity.write(run, first)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    rc = main([f"model.path={model}", f"data.train_files={verl_home / 'data' / 'gsm8k_sft' / 'train.parquet'}",
               f"trainer.default_local_dir={run}", "data.messages_key=messages"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "holds checkpoints of another run (model differ)" in err
    assert "trainer.experiment_name" in err and "trainer.resume_mode=disable" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_the_table_is_a_leaf_module():
    import ast

    tree = ast.parse((ROOT / "jsft" / "verl.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("jsft")]


def test_verl_module_prints_the_doc():
    out = subprocess.run([sys.executable, "-m", "jsft.verl", "--markdown"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out == verl.markdown()


def test_config_summary_shows_lora_sequence_parallelism_and_dynamic_batches():
    from jsft.train.console import config_summary

    plain = config_summary(load_config(None, ["model.path=/m"]))
    assert "lora" not in plain and "sequence" not in plain and "dynamic" not in plain
    summary = config_summary(load_config(None, [
        "model.path=/m", "model.lora_rank=32", "model.lora_alpha=16", "ulysses_sequence_parallel_size=2",
        "data.use_dynamic_bsz=true", "data.max_token_len_per_gpu=2048"]))
    assert "rank 32, alpha 16 on all-linear" in summary
    assert "each row split over 2 devices" in summary
    assert "dynamic micro-batches of 2048 tokens/device" in summary


def test_transformers_torch_advice_is_silenced_before_transformers_loads():
    code = "import jsft, os, sys; assert 'transformers' not in sys.modules; print(os.environ['TRANSFORMERS_NO_ADVISORY_WARNINGS'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "1"

"""An export serves right: a base model fine-tuned on a chat template stops at the template's end-of-turn token
under transformers' generate, the source's sampling defaults survive, the tokenizer and its chat template and a
model card come along, and config.json carries the rope fields both transformers 4.x and 5.x read."""

import json

import torch
import transformers

import jsft.models as jm
from jsft.config import load_config
from jsft.demo import build_tokenizer
from jsft.export import main as export_main
from jsft.sharding import make_mesh
from jsft.train.loop import train
from jsft_testing import make_tiny_hf, sft_overrides

SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def _base_model(root):
    """A 'base' checkpoint: its tokenizer and generation_config end text with <|endoftext|>, while its chat
    template ends each turn with <|im_end|>."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tokenizer(root / "chat_tokenizer"))
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(root / "tokenizer")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    make_tiny_hf(root / "model", "qwen2", vocab_size=768, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=1, eos_token_id=eos, bos_token_id=None)
    transformers.GenerationConfig(eos_token_id=eos, **SAMPLING).save_pretrained(root / "model")
    return tokenizer


def test_base_model_fine_tune_stops_at_the_end_of_turn_under_hf_generate(tmp_path):
    tokenizer = _base_model(tmp_path)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    rows = [{"messages": [{"role": "user", "content": f"Hi {k}"}, {"role": "assistant", "content": "ok"}]}
            for k in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    setup = {"model": str(tmp_path / "model"), "tokenizer": str(tmp_path / "tokenizer"),
             "train": str(tmp_path / "train.jsonl"), "root": tmp_path}
    run = tmp_path / "run"
    cfg = load_config(None, sft_overrides(setup, run, **{
        "trainer.total_training_steps": 40, "optim.lr": 1e-2, "data.max_length": 64, "trainer.export_hf": True,
    }))
    last = train(cfg)
    hf = run / "hf"

    gen = transformers.GenerationConfig.from_pretrained(hf)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert im_end in eos and endoftext in eos  # the template's stop token, and the source's EOS
    assert {k: getattr(gen, k) for k in SAMPLING} == SAMPLING  # the source's sampling defaults are kept

    exported_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert exported_tok.chat_template == tokenizer.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    prompt = exported_tok.apply_chat_template([{"role": "user", "content": "Hi 3"}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False)  # eos from the exported generation_config
    new = out[0, prompt.shape[1]:].tolist()
    assert new[-1] == im_end and len(new) < 20, exported_tok.decode(new)
    assert exported_tok.decode(new[:-1]) == "ok"

    card = (hf / "README.md").read_text()
    assert str(tmp_path / "model") in card and "| optimizer steps | 40 (of 40)" in card
    assert f"| final train loss | {last['train/loss']:.4f} |" in card and "`<|im_end|>`" in card

    # python -m jsft.export of the same checkpoint writes the same serving files
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
    for name in ("generation_config.json", "README.md", "chat_template.jinja"):
        assert (tmp_path / "exported" / name).read_text() == (hf / name).read_text(), name


def test_config_json_has_the_rope_fields_of_transformers_4_and_5(tiny_hf, tmp_path):
    path, _ = tiny_hf("llama3")
    model = jm.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": -1}))
    jm.save_pretrained(model, tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = dict(config["rope_parameters"])
    assert config["rope_theta"] == rope.pop("rope_theta") == 500000.0
    assert config["rope_scaling"] == rope and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert reloaded.rope_parameters == {**rope, "rope_theta": 500000.0}

    path, _ = tiny_hf("qwen2")
    jm.save_pretrained(jm.from_pretrained(path, dtype="float32"), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["rope_scaling"] is None and config["rope_theta"] == config["rope_parameters"]["rope_theta"]

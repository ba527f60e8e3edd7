"""The `data.*` section of the run config: files, chat rendering, masking, truncation and batching."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class DataConfig:
    train_files: Any = None  # path, glob or list: .jsonl / .parquet / .arrow files, datasets.save_to_disk dirs
    val_files: Any = None  # path or list of paths; None disables validation
    tokenizer: Optional[str] = None  # tokenizer directory; None: the model path
    chat_template: Optional[str] = None  # Jinja file or inline template overriding the tokenizer's
    stop_tokens: Optional[List[str]] = None  # token texts generation stops on; None: generation_config.json, else EOS
    messages_key: str = "messages"  # column holding the OpenAI-style message list
    tools_key: str = "tools"  # column holding the tool JSON schemas (optional per row)
    enable_thinking_key: str = "enable_thinking"  # column passed to the template as enable_thinking
    prompt_key: str = "prompt"  # single-turn rows: the user prompt column
    response_key: str = "response"  # single-turn rows: the assistant response column
    # veRL's nested columns: the path of keys inside prompt_key / response_key (gsm8k: extra_info -> [question])
    prompt_dict_keys: Optional[List[str]] = None
    response_dict_keys: Optional[List[str]] = None
    apply_chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra chat-template variables
    multiturn_policy: str = "auto"  # auto | split | single | error
    train_tool_calls: bool = True  # train assistant tool calls
    train_turns: str = "all"  # all | last: which assistant turns are targets
    # ablation, wrong on purpose: also train the text between assistant turns (tool outputs, their headers)
    ablation_train_tool_outputs: bool = False
    max_length: int = 2048  # tokens per sample (and per packed row)
    truncation: str = "error"  # error | left | right
    on_bad_row: str = "error"  # error | skip
    shuffle: bool = True  # deterministic shuffle by seed and epoch
    seed: int = 0  # shuffle seed
    pad_mode: str = "no_padding"  # no_padding (packed rows) | right (one padded sample per row)
    train_batch_size: int = 16  # samples per optimizer step (global, veRL semantics)
    micro_batch_size_per_gpu: int = 2  # rows per device per micro-batch
    use_dynamic_bsz: bool = False  # split micro-batches by a token budget instead of a row count
    max_token_len_per_gpu: int = 8192  # token budget per device per micro-batch with use_dynamic_bsz
    num_workers: int = 2  # tokenization worker processes (0: in process)
    train_max_samples: int = -1  # the first N rows of train_files (-1: all), as veRL
    val_max_samples: int = -1  # the first N rows of val_files (-1: all)
    cache_dir: Optional[str] = None  # on-disk tokenization cache; None: ~/.cache/jsft

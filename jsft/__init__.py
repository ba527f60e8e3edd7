"""jsft: supervised fine-tuning of chat and tool-use language models in JAX/Flax."""

import os

# jsft uses transformers for tokenizers and configs only: its "PyTorch was not found" advice on import is noise
# here. Set before any jsft module imports transformers (every entry point imports this package first).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

"""jsft: supervised fine-tuning of chat and tool-use language models in JAX/Flax."""

__version__ = "0.1.0"

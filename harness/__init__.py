"""VLM/LLM LoRA experiment harness."""

__version__ = "0.1.0"

"""qlora: fine-tune large language models on one GPU with QLoRA."""
__version__ = "0.1.0"

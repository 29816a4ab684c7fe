"""Model integration: load and quantize a Hugging Face checkpoint, inject adapters, save and load
them in PEFT's format, merge, several adapters on one model, patched decoder layers, architecture
presets."""

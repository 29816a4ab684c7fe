"""qlora: fine-tune large language models on one GPU with QLoRA."""
from importlib import import_module

__version__ = "0.1.0"

# The public API, imported on first use so that `import qlora` (the CLI's start) does not pay for
# torch and transformers.
_EXPORTS = {
    "load_model": "qlora.loading",
    "quantize_model": "qlora.loading",
    "add_lora": "qlora.inject",
    "add_adalora": "qlora.inject",
    "trainable_parameters": "qlora.inject",
    "save_adapter": "qlora.adapters",
    "load_adapter": "qlora.adapters",
    "save_adalora_adapter": "qlora.adalora_adapters",
    "load_adalora_adapter": "qlora.adalora_adapters",
    "merge": "qlora.merging",
    "unmerge": "qlora.merging",
    "export_merged": "qlora.merging",
    "set_adapter": "qlora.multi_adapter",
    "disable_adapters": "qlora.multi_adapter",
    "delete_adapter": "qlora.multi_adapter",
    "combine_adapters": "qlora.multi_adapter",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))

"""qlora: fine-tune large language models on one GPU with QLoRA."""
from importlib import import_module

__version__ = "0.1.0"

# The public API, imported on first use so that `import qlora` (the CLI's start) does not pay for
# torch and transformers.
_EXPORTS = {
    "load_model": "qlora.model.loading",
    "quantize_model": "qlora.model.loading",
    "add_lora": "qlora.model.inject",
    "add_adalora": "qlora.model.inject",
    "trainable_parameters": "qlora.model.inject",
    "save_adapter": "qlora.model.adapters",
    "load_adapter": "qlora.model.adapters",
    "save_adalora_adapter": "qlora.adalora.adapter",
    "load_adalora_adapter": "qlora.adalora.adapter",
    "merge": "qlora.model.merging",
    "unmerge": "qlora.model.merging",
    "export_merged": "qlora.model.merging",
    "set_adapter": "qlora.model.multi_adapter",
    "disable_adapters": "qlora.model.multi_adapter",
    "delete_adapter": "qlora.model.multi_adapter",
    "combine_adapters": "qlora.model.multi_adapter",
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

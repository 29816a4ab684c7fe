"""Model architecture presets: Hugging Face ``config.json`` contents shipped with the package.

Each ``<name>.json`` next to this file holds the published architecture hyperparameters of one
model (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size, max_position_embeddings, rope_theta, tie_word_embeddings,
model_type, ...) as in that model's config.json on the Hugging Face Hub, so memory estimates and
random-weight benchmarks need no download. ``tiny-llama`` is a 4-layer, byte-vocabulary (256)
Llama for tests and CPU profiling; ``smollm-135m`` (HuggingFaceTB/SmolLM-135M, a 30-layer Llama of
135M parameters) is a real architecture small enough for whole training steps on a CPU.

    cfg = load_preset("llama-2-7b")                       # dict
    transformers.AutoConfig.for_model(**cfg)              # a PretrainedConfig
"""
import json
from importlib import resources

_SUFFIX = ".json"


def list_presets() -> list[str]:
    """Sorted names of the shipped presets."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[:-len(_SUFFIX)] for f in files if f.name.endswith(_SUFFIX))


def load_preset(name: str) -> dict:
    """The config dict of preset ``name`` (a fresh copy each call).

    Raises ValueError naming the valid presets when ``name`` is not one of them.
    """
    names = list_presets()
    if name not in names:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(names)}")
    text = resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    return json.loads(text)

"""Checks on a Hugging Face checkpoint's ``config.json`` before anything is built from it.

* Custom code: a ``config.json`` with ``auto_map`` points at Python files in the checkpoint
  directory. transformers, when not told, asks on the terminal whether to run them (and takes a
  ``y`` from a pipe). qlora always tells it: the code runs only with ``trust_remote_code=True``
  (``model.trust_remote_code: true`` in a training config); otherwise a model type transformers
  implements itself is built from that implementation, with a warning, and any other is refused.
* Causal language models only: training and ``qlora generate`` need a decoder that predicts the
  next token (a ``...ForCausalLM`` class); a BERT masked-LM or a bare encoder is refused up front
  rather than failing at the first sample.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from qlora.util.files import read_text

CONFIG_NAME = "config.json"
TRUST_HOW = ("set model.trust_remote_code: true in the training config (qlora generate: "
             "--trust-remote-code; Python: trust_remote_code=True)")


def read_config_json(path: Path) -> dict:
    """The parsed ``config.json`` of checkpoint directory ``path``; errors name the file."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (expected a local Hugging Face "
                                f"checkpoint directory)")
    try:
        config = json.loads(read_text(file))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse (ValueError) a checkpoint that only its own shipped code can build, unless
    ``trust_remote_code``; warn when that code is skipped for transformers' own."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    auto_map = config.get("auto_map")
    if not auto_map or trust_remote_code:
        return
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:
        warnings.warn(f"{path / CONFIG_NAME}: the custom code it names (auto_map) is not run; "
                      f"transformers' own {model_type!r} implementation is used "
                      f"(trust_remote_code / model.trust_remote_code: true runs it)", stacklevel=3)
        return
    raise ValueError(f"{path / CONFIG_NAME}: model_type {model_type!r} is implemented by Python "
                     f"code shipped in {path} (auto_map: {json.dumps(auto_map)}); qlora never runs "
                     f"such code unless asked: {TRUST_HOW} if you trust it")


def check_causal_lm(path: Path, config: dict) -> None:
    """Refuse (ValueError) a checkpoint whose ``architectures`` name no causal language model (or,
    naming none, whose ``model_type`` has no causal-LM class in transformers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names = config.get("architectures") or []
    if any(name in causal or name.endswith("ForCausalLM") for name in names):
        return
    if not names and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    named = f"names {', '.join(names)}" if names else \
        f"names no architectures and model_type {config.get('model_type')!r}"
    raise ValueError(f"{path / CONFIG_NAME} {named}, which is not a causal language model; qlora "
                     f"trains and generates with decoder models that predict the next token (a "
                     f"...ForCausalLM class such as LlamaForCausalLM)")

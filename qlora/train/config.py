"""The training config: typed sections, read from YAML and ``--set key=value``, checked on the way in.

    cfg = load_config("run.yaml", overrides=["lora.r=8", "optim.lr=1e-4"])
    cfg.lora.r, cfg.optim.lr
    print(dump_config(cfg))

Defaults are the QLoRA recipe (Dettmers et al. 2023): NF4 with double quantization, bf16
compute, LoRA r=16 with α=16 (scaling α/r = 1) and dropout 0.05 on every linear layer, constant
lr 2e-4 after a 3% warmup, gradient clipping at 0.3, paged AdamW. These are the only defaults:
the built-in tiny run is the shipped config ``builtin:tiny`` (qlora/train/tiny.yaml) on top of
them. Every error names the key and the value that was wrong: an unknown key also names the
closest valid one. Numbers must be finite in float32 (``.nan``, ``.inf`` and 1e39 are refused),
and a key given twice in one YAML mapping is refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from qlora.data.sources import DATA_FORMATS, check_dataset_specs
from qlora.util.files import read_text

FLOAT32_MAX = 3.4028234663852886e38  # a larger lr or decay overflows the optimizer's float32 math
BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:tasks"
BUILTIN_RUN = "builtin:tiny"  # the shipped config of `qlora train` with no arguments
BUILTIN_RUN_FILE = "tiny.yaml"
# the experiment trackers of accelerate that logging.report_to can name
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
AUTO = "auto"  # a memory option `qlora train` decides from the memory plan (qlora.memory.plan)


def _spec(default, *, choices=None, min=None, max=None, min_exclusive=False, nonempty=False, auto=False,
          check=None, help=""):
    """A dataclass field with its allowed values, checked by ``_check_value``; ``auto``: the
    value may also be "auto"; ``check``: a function that raises ValueError for a bad value of a
    list field."""
    meta = dict(choices=choices, min=min, max=max, min_exclusive=min_exclusive, nonempty=nonempty, auto=auto,
                check=check, help=help)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_trackers(key: str, names: list) -> None:
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{key}: {name!r} is not one of {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: names a tracker twice: {names}")


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = _spec(None, nonempty=True,
                                        help="Hugging Face checkpoint directory, a hub model id "
                                        "in the local Hugging Face cache (resolved offline), or "
                                        f"{BUILTIN_MODEL!r}: the shipped tiny Llama with seeded "
                                        "random weights")
    trust_remote_code: bool = _spec(False, help="run the Python code a model directory ships "
                                    "(config.json auto_map); never done otherwise")
    init_seed: int = _spec(0, min=0, help="seed of the built-in model's weights")
    gradient_checkpointing: bool = _spec(False, help="recompute each decoder layer in backward")
    offload_activations: bool = _spec(False, help="with checkpointing: keep layer inputs in "
                                      "pinned host memory (CUDA)")
    fused_kernels: bool = _spec(False, help="swap the fused Triton RMSNorm, SwiGLU and RoPE kernels "
                                "into Llama/Mistral/Qwen2 modules (triton or cuda backend)")
    tiled_mlp: Union[int, str] = _spec(AUTO, min=0, auto=True, help="tokens per chunk of the "
                                       "tiled MLP (intermediates of one chunk at a time); 0: off; "
                                       "auto: on when the memory plan needs it")
    tiled_qkv: Union[int, str] = _spec(AUTO, min=0, auto=True, help="tokens per chunk of each "
                                       "attention's input norm, q/k/v projections and RoPE "
                                       "(Llama/Mistral/Qwen2; the layer then keeps its input, "
                                       "not the normalized one); 0: off; auto: on when the "
                                       "memory plan needs it")
    compact_norms: Union[bool, str] = _spec(AUTO, auto=True, help="RMSNorms keep their input "
                                            "and 1/rms, not an fp32 copy; auto: when the plan "
                                            "needs it")
    embedding_on_host: Union[bool, str] = _spec(AUTO, auto=True, help="the input embedding in "
                                                "host memory, rows gathered per batch (CUDA); "
                                                "auto: when the plan needs it")


@dataclass
class LoraConfig:
    type: str = _spec("lora", choices=["lora", "dora", "adalora"],
                      help="dora: weight-decomposed LoRA; adalora: ranks from init_r pruned to "
                           "target_r per layer on average (the keys below)")
    r: int = _spec(16, min=1)
    dtype: str = _spec(AUTO, choices=[AUTO, "float32", "bfloat16", "float16"],
                       help="LoRA weights' dtype; 16-bit keeps fp32 masters in the optimizer "
                            "(paged_adamw); auto: the compute dtype when the plan needs it")
    alpha: float = _spec(16.0, min=0, min_exclusive=True, help="scaling = alpha / r")
    dropout: float = _spec(0.05, min=0.0, max=0.999)
    target_modules: Union[str, list] = _spec("all-linear", help="'all-linear', 'attention', "
                                             "'mlp', or a list of module names")
    use_rslora: bool = _spec(False, help="scaling = alpha / sqrt(r)")
    modules_to_save: Optional[list] = _spec(None, help="modules trained in full next to the "
                                            "adapters (PEFT's modules_to_save), e.g. [lm_head]")
    init_r: int = _spec(12, min=1, help="adalora: initial rank of every layer")
    target_r: int = _spec(8, min=0, help="adalora: final average rank per layer")
    tinit: int = _spec(0, min=0, help="adalora: warm-up steps before ranks are pruned")
    tfinal: int = _spec(0, min=0, help="adalora: final steps at the fixed final ranks")
    deltaT: int = _spec(1, min=1, help="adalora: steps between rank reallocations")
    beta1: float = _spec(0.85, min=0, min_exclusive=True, max=0.999999, help="adalora: importance smoothing")
    beta2: float = _spec(0.85, min=0, min_exclusive=True, max=0.999999, help="adalora: uncertainty smoothing")
    orth_reg_weight: float = _spec(0.5, min=0.0, help="adalora: weight of the orthogonality "
                                   "penalty on the singular vectors")


@dataclass
class QuantConfig:
    enabled: bool = _spec(True, help="store the base linear weights in NF4")
    blocksize: int = _spec(64, choices=[64, 128, 256, 512, 1024, 2048, 4096])
    double_quant: bool = _spec(True)
    compute_dtype: str = _spec("bfloat16", choices=["bfloat16", "float16", "float32"],
                               help="on CUDA; CPU runs compute in float32")


@dataclass
class DataConfig:
    path: Optional[str] = _spec(None, nonempty=True,
                                help="JSON/JSONL/CSV/Parquet file, a directory written by "
                                "datasets' save_to_disk, a dataset id in the local Hugging Face "
                                f"cache, or {BUILTIN_DATA!r} (shipped)")
    format: str = _spec("alpaca", choices=list(DATA_FORMATS))
    split: str = _spec("train", help="the split of a Hugging Face dataset (save_to_disk or cache)")
    datasets: Optional[list[dict]] = _spec(None, check=check_dataset_specs,
                                           help="several datasets mixed, instead of path: a list of "
                                                "{path, format, split, weight}; format and split "
                                                "default to the keys above, weight (default 1) "
                                                "is how many times each example is used per epoch")
    eval_path: Optional[str] = _spec(None, help="held-out data (any source data.path takes); None: "
                                     "split eval_fraction off each training dataset")
    eval_split: str = _spec("test", help="the split of eval_path when it is a Hugging Face dataset")
    eval_fraction: float = _spec(0.05, min=0.0, max=0.5)
    max_seq_len: int = _spec(512, min=8)
    train_on_prompt: bool = _spec(False, help="also train on the prompt tokens")
    packing: bool = _spec(False, help="several examples per sequence, no attention across them")
    group_by_length: bool = _spec(True, help="batch similar lengths together (when not packing)")
    skip_bad_lines: bool = _spec(False, help="skip and count malformed lines instead of failing")


@dataclass
class TrainConfig:
    output_dir: str = _spec("runs/qlora", nonempty=True, help="the run's directory; one run at a time")
    max_steps: int = _spec(1000, min=1, help="optimizer steps (unless num_epochs is set)")
    num_epochs: Optional[float] = _spec(None, min=0, min_exclusive=True,
                                        help="passes over the training data; when set, it fixes "
                                             "max_steps (rounded up to whole optimizer steps)")
    micro_batch_size: int = _spec(4, min=1, help="sequences per forward pass (per process)")
    gradient_accumulation_steps: int = _spec(4, min=1)
    max_grad_norm: float = _spec(0.3, min=0.0, help="0 disables clipping")
    seed: int = _spec(42, min=0)
    max_bad_steps: int = _spec(5, min=1, help="abort after this many non-finite steps in a row")
    eval_every: int = _spec(0, min=0, help="steps between evaluations; 0: only at the end")
    gpu_memory_gb: Optional[float] = _spec(None, min=0, min_exclusive=True,
                                           help="device memory (GB) the memory plan may use; "
                                                "None: the device's free memory at the start")


@dataclass
class OptimConfig:
    name: str = _spec("paged_adamw", choices=["paged_adamw", "adamw", "bnb_paged_adamw"])
    lr: float = _spec(2e-4, min=0, min_exclusive=True)
    weight_decay: float = _spec(0.0, min=0.0)
    beta1: float = _spec(0.9, min=0.0, max=0.999999)
    beta2: float = _spec(0.999, min=0.0, max=0.999999)
    eps: float = _spec(1e-8, min=0, min_exclusive=True)
    schedule: str = _spec("constant", choices=["constant", "linear", "cosine"])
    warmup_ratio: float = _spec(0.03, min=0.0, max=1.0, help="fraction of max_steps")
    lora_plus_ratio: Optional[float] = _spec(None, min=0, min_exclusive=True,
                                             help="LoRA+: lr of B = ratio * lr; None: off")


@dataclass
class CheckpointConfig:
    every: int = _spec(0, min=0, help="steps between checkpoints; 0: only at the end")
    keep: int = _spec(3, min=1, help="keep the last K checkpoints")


@dataclass
class LoggingConfig:
    progress_bar: bool = _spec(True)
    every: int = _spec(1, min=1, help="steps between metrics lines")
    loss_plot: bool = _spec(True, help="write loss.png at the end")
    report_to: list = _spec([], check=check_trackers,
                            help="trackers that also get the metrics, through accelerate: "
                                 "tensorboard (event files under train.output_dir/tensorboard; "
                                 "pip install 'qlora[tensorboard]'), wandb (pip install "
                                 "'qlora[wandb]'; WANDB_MODE=offline needs no network), mlflow, "
                                 "comet_ml, aim, clearml, dvclive")
    project: str = _spec("qlora", help="the project (wandb, comet_ml, aim) or experiment (mlflow) "
                         "the trackers log the run under")
    sample_prompt: Optional[str] = _spec(None, help="answered before and after training; "
                                         "None: the first held-out example's prompt")
    sample_max_new_tokens: int = _spec(48, min=1)
    exact_match_examples: int = _spec(100, min=0, help="held-out examples answered greedily at "
                                      "each evaluation and scored for an exact answer; 0: none")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def valid_keys() -> list[str]:
    """Every ``section.key`` of the config."""
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(s.default_factory)]


def _closest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(hint) -> str:
    if get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(key: str, value: Any, hint) -> Any:
    """``value`` as type ``hint``, or ValueError naming the key and the value."""
    if get_origin(hint) is Union:
        for option in get_args(hint):
            try:
                return _coerce(key, value, option)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponent floats without a dot ("2e-4") as strings.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif hint == list[dict]:
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return [dict(v) for v in value]
    raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _check_value(key: str, value: Any, meta) -> None:
    if meta.get("check") is not None and value is not None:
        meta["check"](key, value)
    if value is None or isinstance(value, (bool, list)) or (meta.get("auto") and value == AUTO):
        return
    if meta.get("auto") and isinstance(value, str):
        raise ValueError(f"{key}: expected a number, true/false or {AUTO!r}, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{key}: must be a finite number (float32's range, up to "
                         f"{FLOAT32_MAX:.2g}), got {value!r}")
    if meta.get("nonempty") and not value.strip():
        raise ValueError(f"{key}: must not be empty")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta["min_exclusive"] and value == low)):
        bound = f"> {low}" if meta["min_exclusive"] else f">= {low}"
        raise ValueError(f"{key}: must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{key}: must be <= {high}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"{source}: unknown section {section!r}{_closest(section, sections)}")
    target = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    dotted = f"{section}.{key}"
    if key not in fields:
        raise ValueError(f"{source}: unknown key {dotted!r}{_closest(dotted, valid_keys())}")
    hint = get_type_hints(type(target))[key]
    try:
        coerced = _coerce(dotted, value, hint)
        _check_value(dotted, coerced, fields[key].metadata)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    setattr(target, key, coerced)


def update_config(cfg: Config, data: dict, source: str) -> Config:
    """Apply a ``{section: {key: value}}`` mapping (as read from YAML) to ``cfg`` in place."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of sections at the top level, "
                         f"got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: {section!r} must be a section holding key: value pairs, "
                             f"got {values!r}")
        for key, value in values.items():
            _apply(cfg, str(section), str(key), value, source)
    return cfg


def apply_override(cfg: Config, assignment: str) -> Config:
    """Apply one ``section.key=value`` (the value parsed as YAML: 8, 1e-4, true, null, [a, b])."""
    name, sep, text = assignment.partition("=")
    if not sep or "." not in name:
        hint = " (the config file goes before --set)" if name.endswith((".yaml", ".yml")) else ""
        raise ValueError(f"--set {assignment!r}: expected section.key=value, e.g. "
                         f"optim.lr=1e-4{hint}")
    section, _, key = name.strip().partition(".")
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {assignment!r}: value is not valid YAML ({err})") from None
    _apply(cfg, section, key, value, "--set")
    return cfg


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the safe loader keeps
    the last value silently, so a config could say one thing and train another)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise DuplicateKeyError(None, None, f"duplicate key {key!r} (first on line "
                                        f"{first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict:
    """The YAML file ``path``, or the shipped config :data:`BUILTIN_RUN`."""
    try:
        if path == BUILTIN_RUN:
            text = resources.files("qlora.train").joinpath(BUILTIN_RUN_FILE).read_text(encoding="utf-8")
        else:
            text = read_text(path)
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = err.problem if isinstance(err, DuplicateKeyError) else f"not valid YAML ({err.problem})"
        raise ValueError(f"{path}: {where}{what}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    return {} if data is None else data


def load_config(path: Optional[str] = None, overrides=()) -> Config:
    """Defaults, then the YAML file at ``path`` (or the shipped :data:`BUILTIN_RUN`), then
    ``overrides``."""
    cfg = Config()
    if path is not None:
        update_config(cfg, read_yaml(path), path)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

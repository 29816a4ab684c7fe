"""The training config: QLoRA defaults, YAML and --set, errors naming the key and the value."""
from pathlib import Path

import pytest
import yaml

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN, Config, apply_override, dump_config, load_config, \
    update_config, valid_keys


def test_defaults_are_the_qlora_recipe():
    cfg = Config()
    assert (cfg.quant.enabled, cfg.quant.double_quant, cfg.quant.compute_dtype) == (True, True, "bfloat16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16.0, 0.05)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (2e-4, "constant", 0.03)
    assert (cfg.train.max_grad_norm, cfg.optim.name) == (0.3, "paged_adamw")
    assert (cfg.data.max_seq_len, cfg.train.max_steps, cfg.train.num_epochs) == (512, 1000, None)
    # no model or data by default: a run names them (or is the built-in run, a shipped config)
    assert (cfg.model.name_or_path, cfg.data.path) == (None, None)
    assert {k.split(".")[0] for k in valid_keys()} == {
        "model", "lora", "quant", "data", "train", "optim", "checkpoint", "logging"}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    # "2e-4" without a dot is a string to YAML 1.1; the float field still takes it.
    path.write_text("lora:\n  r: 8\noptim:\n  lr: 2e-4\n  schedule: cosine\n"
                    "data:\n  packing: true\n")
    cfg = load_config(str(path), ["lora.r=4", "optim.lora_plus_ratio=16", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.r == 4 and cfg.optim.lr == 2e-4 and cfg.optim.schedule == "cosine"
    assert cfg.data.packing is True and cfg.optim.lora_plus_ratio == 16.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    # the dump reads back to the same config
    assert update_config(Config(), yaml.safe_load(dump_config(cfg)), "dump") == cfg


@pytest.mark.parametrize("text, message", [
    ("lora:\n  rank: 8\n", "unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ("optimizer:\n  lr: 1\n", "unknown section 'optimizer'; did you mean 'optim'?"),
    ("lora:\n  r: eight\n", "lora.r: expected int, got 'eight'"),
    ("lora:\n  r: 2.5\n", "lora.r: expected int, got 2.5"),
    ("lora:\n  r: 0\n", "lora.r: must be >= 1, got 0"),
    ("optim:\n  lr: -1\n", "optim.lr: must be > 0, got -1.0"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout: must be <= 0.999, got 1.5"),
    ("optim:\n  schedule: step\n", "optim.schedule: 'step' is not one of constant, linear, cosine"),
    ("data:\n  packing: yes please\n", "data.packing: expected bool, got 'yes please'"),
    ("lora: 8\n", "'lora' must be a section holding key: value pairs, got 8"),
    ("optim:\n  lr: .nan\n", "optim.lr: must be a finite number (float32's range, up to 3.4e+38), got nan"),
    ("optim:\n  weight_decay: .inf\n", "optim.weight_decay: must be a finite number (float32's range, up to 3.4e+38), got inf"),
    ("train:\n  max_grad_norm: .nan\n", "train.max_grad_norm: must be a finite number (float32's range, up to 3.4e+38), got nan"),
    ("train:\n  output_dir: ''\n", "train.output_dir: must not be empty"),
    ("data:\n  path: ' '\n", "data.path: must not be empty"),
    ("train:\n  max_steps: 3\n  max_steps: 5\n",
     "line 3, column 3: duplicate key 'max_steps' (first on line 2)"),
    ("train:\n  max_steps: 3\ntrain:\n  seed: 1\n",
     "line 3, column 1: duplicate key 'train' (first on line 1)"),
])
def test_bad_yaml_names_file_key_and_value(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path}: {message}"


def test_config_that_is_not_utf8_or_not_a_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  max_steps: 3\n  # café\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    assert str(err.value) == (f"{path}: line 3: not UTF-8 text (byte 0xe9 at offset 29); save the "
                              f"file as UTF-8")
    with pytest.raises(ValueError) as err:
        load_config(str(tmp_path))
    assert str(err.value) == f"{tmp_path}: is a directory, expected a file"
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'nope.yaml'}: no such file$"):
        load_config(str(tmp_path / "nope.yaml"))


def test_bad_override_names_key_and_value():
    with pytest.raises(ValueError, match=r"^--set: unknown key 'train.max_step'; did you mean "
                                         r"'train.max_steps'\?$"):
        apply_override(Config(), "train.max_step=10")
    with pytest.raises(ValueError, match=r"^--set: optim.lr: expected float, got 'fast'$"):
        apply_override(Config(), "optim.lr=fast")
    with pytest.raises(ValueError, match="expected section.key=value"):
        apply_override(Config(), "lr")
    for assignment in ("optim.lr=.nan", "optim.lr=.inf", "optim.lr=-.inf", "optim.lr=1e39"):
        with pytest.raises(ValueError, match=r"^--set: optim.lr: must be a finite number"):
            apply_override(Config(), assignment)
    with pytest.raises(ValueError, match=r"^--set: train.output_dir: must not be empty$"):
        apply_override(Config(), "train.output_dir=")


def test_cli_print_config_and_error(capsys):
    assert main(["train", "--print-config", "--set", "lora.r=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["r"] == 4
    assert main(["train", "--print-config", "--set", "lora.alpah=4"]) == 2
    assert "did you mean 'lora.alpha'?" in capsys.readouterr().err


def test_cli_set_takes_several_assignments(capsys):
    assert main(["train", "--print-config", "--set", "lora.r=4", "optim.lr=1e-3",
                 "--set", "train.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lora"]["r"], printed["optim"]["lr"], printed["train"]["max_steps"]) == (4, 1e-3, 7)
    # a config file after --set would be read as an assignment: say so
    assert main(["train", "--print-config", "--set", "lora.r=4", "run.yaml"]) == 2
    assert "the config file goes before --set" in capsys.readouterr().err


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["llama-2-7b.yaml", "llama-2-70b.yaml"])
def test_example_configs_load(name):
    cfg = load_config(str(EXAMPLES / name))
    assert cfg.quant.enabled and cfg.optim.name == "paged_adamw"


def test_one_set_of_defaults_and_the_builtin_run_is_a_shipped_config(capsys):
    """`qlora train` alone is the built-in run; --set without a config file changes the recipe
    defaults, not the built-in run's settings (which once leaked into such runs: max_seq_len 64,
    r 64, lr 1e-3, 600 steps)."""
    def printed(*args):
        assert main(["train", *args, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    recipe = yaml.safe_load(dump_config(Config()))
    assert printed() == recipe  # --print-config alone: every key with its default
    builtin = printed(BUILTIN_RUN)
    assert resolve_config(None, []) == load_config(BUILTIN_RUN)  # `qlora train` alone
    assert (builtin["model"]["name_or_path"], builtin["data"]["path"]) == ("builtin:tiny-llama", "builtin:tasks")
    assert (builtin["data"]["max_seq_len"], builtin["lora"]["r"], builtin["optim"]["lr"],
            builtin["train"]["max_steps"]) == (64, 64, 1e-3, 600)
    # the shipped config sets only what differs from the recipe: every other key is a default
    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "qlora" / "train" / "tiny.yaml").read_text())
    for section, keys in builtin.items():
        for key, value in keys.items():
            assert value == shipped.get(section, {}).get(key, recipe[section][key]), f"{section}.{key}"

    own = printed("--set", "model.name_or_path=/models/x", "data.path=data.jsonl")
    assert own == {**recipe, "model": {**recipe["model"], "name_or_path": "/models/x"},
                   "data": {**recipe["data"], "path": "data.jsonl"}}
    # the built-in run shortened
    assert printed(BUILTIN_RUN, "--set", "train.max_steps=5")["train"]["max_steps"] == 5


def test_missing_model_or_data_is_named(tmp_path, capsys):
    assert main(["train", "--set", f"train.output_dir={tmp_path}", "model.name_or_path=builtin:tiny-llama"]) == 2
    assert "data.path: not set" in capsys.readouterr().err
    assert main(["train", "--set", f"train.output_dir={tmp_path}", "data.path=builtin:tasks"]) == 2
    assert "model.name_or_path: not set" in capsys.readouterr().err

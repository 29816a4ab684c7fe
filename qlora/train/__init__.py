"""Training: the typed config, the accelerate loop, checkpoints and exact resume.

    from qlora.train import load_config, train
    result = train(load_config("builtin:tiny", overrides=["train.max_steps=50"]))
"""
from qlora.train.config import Config, dump_config, load_config
from qlora.train.loop import TrainResult, train

__all__ = ["Config", "TrainResult", "dump_config", "load_config", "train"]

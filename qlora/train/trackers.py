"""The experiment trackers of ``logging.report_to``, through accelerate.

TensorBoard writes under ``train.output_dir/tensorboard``; wandb keeps its run files under
``train.output_dir/wandb`` (with ``WANDB_MODE=offline`` it needs no network and ``wandb sync``
uploads them later); the others log as their own environment variables say. All get the same
numbers as metrics.jsonl (:func:`qlora.train.metrics.tracker_values`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora.train.config import Config

# tracker -> (accelerate's availability check, how to install what it needs)
_PACKAGES = {
    "tensorboard": ("is_tensorboard_available", "pip install 'qlora[tensorboard]'"),
    "wandb": ("is_wandb_available", "pip install 'qlora[wandb]'"),
    "mlflow": ("is_mlflow_available", "pip install mlflow"),
    "comet_ml": ("is_comet_ml_available", "pip install comet_ml"),
    "aim": ("is_aim_available", "pip install aim"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
}


class Trackers:
    """What ``Accelerator(log_with=...)`` and ``init_trackers`` get for ``cfg.logging.report_to``."""

    def __init__(self, cfg: Config, output_dir: Path):
        import accelerate.utils
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.names = list(cfg.logging.report_to)
        self.project = cfg.logging.project
        for name in self.names:
            check, install = _PACKAGES[name]
            if not getattr(accelerate.utils, check)():
                raise ValueError(f"logging.report_to: {name} needs its package: {install}")
        self.tensorboard: Optional[TensorBoardTracker] = None
        self.log_with: list = []
        for name in self.names:
            if name == "tensorboard":
                self.tensorboard = TensorBoardTracker("tensorboard", str(output_dir))
                self.log_with.append(self.tensorboard)
            elif name == "wandb":
                self.log_with.append(WandBTracker(self.project, dir=str(output_dir),
                                                  name=output_dir.name))
            else:
                self.log_with.append(name)

    def start(self, accelerator, config: dict, resume_step: Optional[int]) -> None:
        """Start every tracker with the run's hyperparameters ``config``. A resumed run's
        TensorBoard hides what the interrupted one logged after ``resume_step``, as the JSONL
        drops those lines."""
        if not self.names:
            return
        if self.tensorboard is not None and resume_step is not None:
            self.tensorboard.init_kwargs["purge_step"] = resume_step + 1
        accelerator.init_trackers(self.project, config=config)

"""`qlora train [CONFIG.yaml] [--set key=value ...] [--print-config] [--resume [DIR]]
[--overwrite] [--allow-changed-data]`."""
from __future__ import annotations

import sys
from importlib import resources

DEFAULT_CONFIG = "default.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune with QLoRA (no arguments: the built-in tiny run on CPU)",
        description="Fine-tune a model with QLoRA. Without CONFIG, the built-in run: a tiny "
                    "byte-level Llama learns the shipped tasks in a few minutes on a CPU.")
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (sections model, lora, quant, data, train, optim, "
                             "checkpoint, logging); default: the built-in run")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override keys, e.g. --set optim.lr=1e-4 train.max_steps=50 "
                             "(repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="continue from the latest checkpoint under train.output_dir, or DIR "
                             "(a larger train.max_steps continues a finished run; checkpoints "
                             "newer than DIR in train.output_dir are removed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in train.output_dir: its config, metrics, "
                             "adapter, checkpoints and plots are removed first (without this, a "
                             "new run refuses a directory that holds one)")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="with --resume: continue even though a data file differs from the "
                             "one the checkpoint was trained on (size or SHA-256); without this "
                             "such a resume is refused, naming the file")
    parser.set_defaults(func=run_train)


def resolve_config(config_path, overrides):
    from qlora.train.config import load_config
    import yaml

    base = None
    if config_path is None:
        text = resources.files("qlora.train").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
        base = yaml.safe_load(text)
    return load_config(config_path, overrides, base=base)


def run_train(args) -> int:
    from qlora.memory.plan import plan_for_run
    from qlora.train import dump_config, train
    from qlora.train.guard import TrainingStopped

    cfg = resolve_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.allow_changed_data and args.resume is None:
        raise ValueError("--allow-changed-data only applies with --resume")
    plan = plan_for_run(cfg, args.resume)
    try:
        train(cfg, resume=args.resume, plan=plan, overwrite=args.overwrite,
              allow_changed_data=args.allow_changed_data)
    except TrainingStopped as err:
        print(f"qlora train: stopped: {err}", file=sys.stderr)
        return 1
    return 0

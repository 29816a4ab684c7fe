"""`qlora train [CONFIG.yaml] [--set key=value ...] [--print-config] [--resume [DIR]]
[--overwrite] [--allow-changed-data]`."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune with QLoRA (no arguments: the built-in tiny run on CPU)",
        description="Fine-tune a model with QLoRA. Defaults: the QLoRA recipe (--print-config "
                    "shows every key). With no arguments at all, the built-in run builtin:tiny: a "
                    "tiny byte-level Llama learns the shipped tasks in a few minutes on a CPU.")
    add_config_arguments(parser, "override keys, e.g. --set optim.lr=1e-4 train.max_steps=50 "
                                 "(repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (alone: the recipe defaults, "
                             "every key)")
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


def add_config_arguments(parser, set_help: str) -> None:
    """CONFIG and ``--set``, as every command that reads a run's config takes them (train, eval,
    export, sweep); :func:`resolve_config` turns them into the config."""
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (sections model, lora, quant, data, train, optim, "
                             "checkpoint, logging), e.g. a run's config.yaml, or builtin:tiny (the "
                             "shipped built-in run); without it: the recipe defaults and --set, or "
                             "builtin:tiny when there is no --set either")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE", help=set_help)


def resolve_config(config_path, overrides):
    """The recipe defaults, then ``config_path`` (a YAML file or builtin:tiny), then
    ``overrides``; with neither a file nor overrides, the built-in run."""
    from qlora.train.config import BUILTIN_RUN, load_config

    if config_path is None and not overrides:
        config_path = BUILTIN_RUN
    return load_config(config_path, overrides)


def run_train(args) -> int:
    from qlora.memory.plan import plan_for_run
    from qlora.train import dump_config, load_config, train
    from qlora.train.dataset import locate_data
    from qlora.train.guard import TrainingStopped
    from qlora.train.model import checked_model_path

    if args.print_config:
        alone = args.config is None and not args.overrides
        print(dump_config(load_config() if alone else resolve_config(args.config, args.overrides)), end="")
        return 0
    cfg = resolve_config(args.config, args.overrides)
    if args.allow_changed_data and args.resume is None:
        raise ValueError("--allow-changed-data only applies with --resume")
    checked_model_path(cfg)  # a missing model or data is named before the plan reads them
    locate_data(cfg)
    plan = plan_for_run(cfg, args.resume)
    try:
        train(cfg, resume=args.resume, plan=plan, overwrite=args.overwrite,
              allow_changed_data=args.allow_changed_data)
    except TrainingStopped as err:
        print(f"qlora train: stopped: {err}", file=sys.stderr)
        return 1
    return 0

"""`qlora sweep [CONFIG] --set KEY=V1,V2,... [--set key=value ...] [--out DIR]`: one training per
value, then a table and a plot; started again, it continues where it stopped."""
from __future__ import annotations

import sys

from qlora.cli.train import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="one training per value of a config key (e.g. lora.r=4,8,16), then a table and a plot",
        description="Train once per value of one key, with the same data and seed, one run after another; "
                    "write a table (sweep.md/.csv/.json) and a plot (sweep.png) of held-out loss, exact "
                    "match, trainable-parameter share, peak memory and tokens/s against the value. "
                    "Finished runs are kept and an interrupted one resumes, so running the same "
                    "command again continues the sweep.")
    add_config_arguments(parser, "the swept key with its values separated by commas (e.g. lora.r=4,8,16 "
                                 "or lora.target_modules=attention,mlp,all-linear), and fixed overrides")
    parser.add_argument("--out", default=None,
                        help="directory of the sweep; default: train.output_dir + '-sweep-KEY'")
    parser.set_defaults(func=run_sweep)


def run_sweep(args) -> int:
    from qlora.train.sweep import RunFailed, sweep

    try:
        sweep(args.config, args.overrides, args.out)
    except RunFailed as err:
        print(f"qlora sweep: error: {err}", file=sys.stderr)
        return 1
    return 0

"""`qlora eval [CONFIG] [--adapter DIR | --no-adapter] [--set key=value ...]`: score a model and
adapter on the config's held-out data without training."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from qlora.cli.train import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="held-out loss, perplexity and exact match of a model and adapter, no training",
        description="Evaluate without training: the config's model with an adapter on its held-out "
                    "data (data.eval_path, or the run's seeded data.eval_fraction split).")
    add_config_arguments(parser, "override config keys, as qlora train does")
    add_adapter_arguments(parser, "evaluate the base model alone")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    parser.set_defaults(func=run_eval_command)


def add_adapter_arguments(parser, no_adapter_help: str) -> None:
    """``--adapter DIR`` or ``--no-adapter`` (:func:`run_adapter` picks the adapter from them)."""
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", default=None,
                         help="PEFT adapter directory; default: the run's, train.output_dir/adapter")
    adapter.add_argument("--no-adapter", action="store_true", help=no_adapter_help)


def run_adapter(cfg, adapter: Optional[str], no_adapter: bool) -> Optional[str]:
    """The adapter a command uses: ``adapter``, or the run's (train.output_dir/adapter), or none."""
    if no_adapter:
        return None
    adapter = adapter or str(Path(cfg.train.output_dir) / "adapter")
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"no adapter at {adapter}: give --adapter DIR, or --no-adapter to use "
                                f"the base model alone")
    return adapter


def run_eval_command(args) -> int:
    from qlora.cli.train import resolve_config
    from qlora.train.evaluation import run_eval

    cfg = resolve_config(args.config, args.overrides)
    adapter = run_adapter(cfg, args.adapter, args.no_adapter)
    print(f"model: {cfg.model.name_or_path}, adapter: {adapter or 'none'}")
    result = run_eval(cfg, adapter)
    print("\n".join(result.lines()))
    if args.out is not None:
        Path(args.out).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return 0

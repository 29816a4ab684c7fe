"""`qlora export [CONFIG] --out DIR [--adapter DIR] [--dtype bf16|f16|f32] [--nf4] [--gguf TYPE]`:
a run's adapter merged into its model, as a checkpoint that transformers, `qlora generate` and
(with --gguf) llama.cpp / Ollama load directly."""
from __future__ import annotations

from qlora.cli.eval import add_adapter_arguments
from qlora.cli.train import add_config_arguments

# the choices of qlora.train.exporting.EXPORT_DTYPES and qlora.model.gguf.GGUF_TYPES, named here so
# that the command line starts without importing torch
EXPORT_DTYPES = ("bf16", "f16", "f32")
GGUF_TYPES = ("f16", "bf16", "q8_0")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="merge an adapter into its model and write a checkpoint that serves (HF, NF4, GGUF)",
        description="Merge the adapter into the config's model and write a Hugging Face checkpoint "
                    "with the tokenizer, chat template and generation config, and the merge's error "
                    "on a few training batches (merge_report.json).")
    add_config_arguments(parser, "override config keys, as qlora train does")
    parser.add_argument("--out", required=True, help="new directory for the export")
    add_adapter_arguments(parser, "export the base model alone (with --nf4: its NF4 codes and "
                                  "scales bit for bit)")
    parser.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="bf16",
                        help="dtype of the merged weights (default bf16)")
    parser.add_argument("--nf4", action="store_true",
                        help="keep the quantized layers in NF4, bitsandbytes' format (merged ones quantized "
                             "again, with the per-layer error printed)")
    parser.add_argument("--gguf", choices=list(GGUF_TYPES), default=None,
                        help="also write OUT/model-TYPE.gguf for llama.cpp / Ollama (needs the gguf package: "
                             "pip install 'qlora[gguf]')")
    parser.add_argument("--report-batches", type=int, default=4, metavar="N",
                        help="training batches the merged model is compared on (0: skip; the comparison "
                             "holds both models in memory)")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from qlora.cli.eval import run_adapter
    from qlora.cli.train import resolve_config
    from qlora.train.exporting import export_run

    if args.report_batches < 0:
        raise ValueError(f"--report-batches must be >= 0, got {args.report_batches}")
    cfg = resolve_config(args.config, args.overrides)
    export_run(cfg, run_adapter(cfg, args.adapter, args.no_adapter), args.out, args.dtype, args.nf4,
               args.gguf, args.report_batches)
    return 0

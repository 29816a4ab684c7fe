"""`qlora memory estimate` and `qlora memory profile`."""
import argparse
import json
import math

from qlora.memory import estimate as est
from qlora.memory import report


def register(subparsers) -> None:
    parser = subparsers.add_parser("memory", help="estimate or profile training memory")
    commands = parser.add_subparsers(dest="memory_command", required=True)

    e = commands.add_parser("estimate", help="closed-form memory estimate of a QLoRA step")
    e.add_argument("--model", required=True,
                   help="preset name, config.json, or checkpoint directory holding a config.json")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--rank", type=int, default=16)
    e.add_argument("--targets", default="all-linear",
                   help="'all-linear' or comma-separated projections (q_proj,v_proj,...)")
    e.add_argument("--optimizer", choices=est.OPTIMIZERS, default=None,
                   help="default: paged_adamw on one GPU, adamw with --gpus > 1 (what FSDP trains with)")
    e.add_argument("--gpus", type=int, default=1,
                   help="per-GPU memory when FSDP2 shards the run over this many GPUs")
    e.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--offload-checkpoints", action="store_true",
                   help="keep the layer checkpoints in host memory")
    e.add_argument("--chunked-loss", action="store_true",
                   help="lm_head + cross-entropy chunk by chunk (no full logits tensor)")
    e.add_argument("--tiled-mlp", type=int, default=0, metavar="TOKENS",
                   help="run each MLP over chunks of TOKENS tokens (0: off)")
    e.add_argument("--tiled-qkv", type=int, default=0, metavar="TOKENS",
                   help="run each attention's input norm, q/k/v projections and RoPE over "
                        "chunks of TOKENS tokens (0: off)")
    e.add_argument("--compact-norms", action="store_true",
                   help="RMSNorms keep their input and 1/rms, not an fp32 copy")
    e.add_argument("--embedding-on-host", action="store_true",
                   help="keep the input embedding in host memory")
    e.add_argument("--lora-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="LoRA weights' dtype (bfloat16: fp32 masters in the optimizer's pages)")
    e.add_argument("--gpu-gb", type=float, default=24.0,
                   help="GPU memory in GB (10^9 bytes); optimizer pages beyond it go to the host")
    e.add_argument("--max-context", action="store_true",
                   help="print the longest sequence that fits at batch 1 with the best options, "
                        "and what each option buys")
    e.add_argument("--json", action="store_true", help="print JSON instead of tables")
    e.set_defaults(func=run_estimate)

    p = commands.add_parser("profile", help="run real training steps and measure memory")
    p.add_argument("config", nargs="?", default=None,
                   help="training YAML (default: the tiny Llama profile of qlora.memory.profile)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="memory_profile", help="directory for the report files")
    p.set_defaults(func=run_profile)


def run_estimate(args) -> int:
    if not (math.isfinite(args.gpu_gb) and args.gpu_gb > 0):
        raise ValueError(f"--gpu-gb must be a positive number of GB, got {args.gpu_gb:g}")
    config, source = est.load_config(args.model)
    budget = int(args.gpu_gb * est.GB)
    setup = est.TrainSetup(seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                           targets=est.parse_targets(args.targets), gpus=args.gpus,
                           optimizer=args.optimizer or ("adamw" if args.gpus > 1 else "paged_adamw"),
                           grad_checkpointing=args.grad_checkpointing,
                           offload_checkpoints=args.offload_checkpoints, chunked_loss=args.chunked_loss,
                           tiled_mlp=args.tiled_mlp, tiled_qkv=args.tiled_qkv, compact_norms=args.compact_norms,
                           embedding_on_host=args.embedding_on_host,
                           lora_bytes=4 if args.lora_dtype == "float32" else 2,
                           gpu_budget_bytes=budget)
    if args.max_context:
        from qlora.memory.max_context import ladder

        rows = ladder(config, budget, setup)
        if args.json:
            print(json.dumps({"model": source, "gpu_budget_bytes": budget, "ladder": rows}, indent=2))
        else:
            print(report.max_context_table(rows, source, budget, setup))
        return 0
    estimate = est.estimate(config, setup, source)
    rows = est.comparison(config, setup)
    fit = est.largest_fit(config, setup, budget)
    if args.json:
        print(json.dumps(report.estimate_dict(estimate, rows, fit, budget), indent=2))
    else:
        print(report.estimate_table(estimate, rows, fit, budget))
    return 0


def run_profile(args) -> int:
    from qlora.memory import profile

    if args.steps < 2:
        raise SystemExit("qlora memory profile: --steps must be >= 2 (the first step warms up)")
    settings = profile.ProfileSettings() if args.config is None else profile.settings_from_yaml(args.config)
    result = profile.run_profile(settings, steps=args.steps, out_dir=args.out)
    print(result["table"])
    print(f"wrote {', '.join(result['files'])}")
    return 0

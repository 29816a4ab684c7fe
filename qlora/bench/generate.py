"""`qlora bench generate`: decoding speed of base + adapter against the merged export, so "merging
removes the adapter's latency" is a measured statement.

Providers, all greedy ``model.generate`` with a KV cache from the same prompt:

* ``base+adapter``: the NF4 base with the LoRA adapter beside it (``qlora generate --adapter``):
  every adapted layer runs W0·x and the adapter's B(A·x).
* ``merged-nf4``: the merged 16-bit export quantized to NF4 on loading (``qlora generate --model
  EXPORT``): the same base format without the adapter's matmuls.
* ``merged-dense``: the merged export loaded by transformers in the compute dtype
  (``qlora generate --model EXPORT --no-quant``, or any Hugging Face server).

The adapter is ``--adapter DIR``, or a fresh LoRA (``--rank``, every linear layer, random B so it is
not zero) when none is given. The export goes to a temporary directory. The three models are held
at once and timed in interleaved rounds (qlora.bench.harness): generating ``--new-tokens`` and
generating one token, so prefill ms = the one-token time and decode ms/token = (t_N - t_1) / (N - 1);
``min_new_tokens`` keeps EOS from ending a run early. Each row also says how many of its generated
tokens equal base+adapter's (the merged models differ from it by the export's rounding only).

Files in ``--out``: bench_generate.json / .csv (one row per provider) and bench_generate.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from qlora.bench import harness

PROVIDERS = ("base+adapter", "merged-nf4", "merged-dense")
QUICK = dict(model="builtin:tiny-llama", prompt_len=16, new_tokens=24, batch_size=1, rounds=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (or a model in the local cache), or "
                             "builtin:tiny-llama")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter; default: a fresh random one")
    parser.add_argument("--rank", type=int, default=16, help="rank of the fresh adapter (default 16)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts generated at once (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5)")
    harness.add_run_arguments(parser, f"{QUICK['model']}, prompt {QUICK['prompt_len']}, {QUICK['new_tokens']} new "
                                      f"tokens, {QUICK['rounds']} rounds, on CPU")


def _resolve(args) -> dict:
    settings = harness.option_values(args, QUICK, dict(model=None, prompt_len=128, new_tokens=128,
                                                       batch_size=1, rounds=5))
    settings.update(adapter=args.adapter, rank=args.rank)
    if settings["model"] is None:
        raise ValueError("--model is required (or --quick)")
    harness.require_positive(settings, ("rank", "prompt_len", "batch_size", "rounds"))
    if settings["new_tokens"] < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode time is t_N - t_1), got {settings['new_tokens']}")
    settings["device"] = str(harness.run_device(args))
    return settings


def _models(settings: dict, export_dir: Path) -> dict:
    """{provider: model}: base + adapter, then its merged export loaded both ways."""
    from transformers import AutoModelForCausalLM

    from qlora.model.adapters import load_adapter
    from qlora.model.inject import add_lora, lora_layers
    from qlora.model.merging import export_merged
    from qlora.train.config import Config
    from qlora.train.model import base_model, compute_dtype

    device = torch.device(settings["device"])
    cfg = Config()
    cfg.model.name_or_path = settings["model"]
    adapted = base_model(cfg, device)
    if settings["adapter"] is not None:
        load_adapter(adapted, settings["adapter"])
    else:
        generator = torch.Generator().manual_seed(0)
        add_lora(adapted, r=settings["rank"], alpha=settings["rank"], target_modules="all-linear")
        with torch.no_grad():
            for _, layer in lora_layers(adapted):
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=generator).to(b) * 0.01)
    adapted.to(device).eval()
    dtype = compute_dtype(cfg, device)
    export_merged(adapted, export_dir, dtype=dtype, log=None)
    cfg.model.name_or_path = str(export_dir)
    merged_nf4 = base_model(cfg, device).eval()
    merged_dense = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
    return {"base+adapter": adapted, "merged-nf4": merged_nf4, "merged-dense": merged_dense}


def _generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    return ids[:, prompt.shape[1]:]


def run(args) -> dict:
    with harness.quick_threads(args.quick):
        return _run(args)


def _run(args) -> dict:
    settings = _resolve(args)
    device = torch.device(settings["device"])
    with tempfile.TemporaryDirectory(prefix="qlora-bench-generate-") as tmp:
        models = _models(settings, Path(tmp) / "merged")
        vocab = models["merged-dense"].config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (settings["batch_size"], settings["prompt_len"]),
                               generator=gen).to(device)
        n = settings["new_tokens"]
        outputs = {name: _generate(model, prompt, n) for name, model in models.items()}  # also warms up
        fns = {}
        for name, model in models.items():
            fns[f"{name}/1"] = lambda model=model: _generate(model, prompt, 1)
            fns[f"{name}/{n}"] = lambda model=model: _generate(model, prompt, n)
        timed = harness.time_interleaved(fns, device, rounds=settings["rounds"],
                                         budget_ms=50.0 if args.quick else 500.0)
    command = harness.command_line("qlora bench generate", dict(
        model=settings["model"], adapter=settings["adapter"], rank=settings["rank"],
        prompt_len=settings["prompt_len"], new_tokens=n, batch_size=settings["batch_size"],
        rounds=settings["rounds"], device=settings["device"], quick=args.quick, out=args.out))
    env = harness.environment(device, command)
    rows = []
    for name in PROVIDERS:
        prefill, full = timed[f"{name}/1"], timed[f"{name}/{n}"]
        decode_ms = (full[0] - prefill[0]) / (n - 1)
        rows.append(dict(**env, provider=name, model=settings["model"],
                         adapter=settings["adapter"] or f"random LoRA r={settings['rank']}",
                         prompt_len=settings["prompt_len"], new_tokens=n, batch_size=settings["batch_size"],
                         prefill_ms=prefill[0], generate_ms_p50=full[0], generate_ms_p20=full[1],
                         generate_ms_p80=full[2], decode_ms_per_token=decode_ms,
                         decode_tokens_per_s=settings["batch_size"] * 1000.0 / decode_ms,
                         same_tokens_as_adapter=float((outputs[name] == outputs["base+adapter"]).float().mean())))
    base = rows[0]["decode_ms_per_token"]
    for row in rows:
        row["decode_speedup_vs_adapter"] = base / row["decode_ms_per_token"]
    out_dir = Path(args.out)
    files = harness.write_rows(rows, out_dir, "bench_generate")
    text = markdown(rows, env)
    (out_dir / "bench_generate.md").write_text(text, encoding="utf-8")
    return {"rows": rows, "files": [*files, out_dir / "bench_generate.md"], "markdown": text}


def markdown(rows: list, env: dict) -> str:
    first = rows[0]
    header = ["provider", "decode tokens/s", "decode ms/token", "× base+adapter", "prefill ms",
              f"generate {first['new_tokens']} ms", "same tokens as base+adapter"]
    table = [[row["provider"], harness.fmt(row["decode_tokens_per_s"], 4), harness.fmt(row["decode_ms_per_token"]),
              harness.fmt(row["decode_speedup_vs_adapter"]), harness.fmt(row["prefill_ms"]),
              f"{row['generate_ms_p50']:.4g} [{row['generate_ms_p20']:.4g}, {row['generate_ms_p80']:.4g}]",
              f"{100 * row['same_tokens_as_adapter']:.0f}%"] for row in rows]
    lines = ["# qlora bench generate", "", *harness.environment_lines(env),
             f"- model: {first['model']}, adapter: {first['adapter']}, batch {first['batch_size']}, prompt "
             f"{first['prompt_len']} tokens, {first['new_tokens']} generated greedily", ""]
    if env["device_type"] != "cuda":
        lines += ["**CPU run**: shows that all three generate; it says nothing about GPU decoding speed.", ""]
    lines += ["decode ms/token: (time to generate N tokens - time to generate 1) / (N - 1), medians; "
              "generate ms: median [20th, 80th percentile].", "", harness.markdown_table(header, table), ""]
    return "\n".join(lines)


def main_from_args(args) -> int:
    return harness.print_report(run(args))

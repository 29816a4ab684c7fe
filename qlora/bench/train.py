"""`qlora bench train`: whole QLoRA training steps of a preset architecture, ours against the
Hugging Face stack, on the same batch.

Both stacks get the same model: the preset's architecture built on the meta device, then
materialized one decoder layer at a time with seeded random weights (N(0, 0.02²) matrices, unit
norm weights) and quantized to NF4 before the next layer exists, so the 16-bit copy of at most
one layer is ever alive and a 70B model fits. The NF4 bits are identical in both stacks.

* ``qlora``: ``qlora.quantize_model`` (NF4 ``Linear4bit``) + ``qlora.add_lora``; on the Triton
  backend the fused RMSNorm / SwiGLU / RoPE patch and the chunked cross-entropy (no logits
  tensor); gradient checkpointing of every decoder layer (``qlora.ops.offload``); ``PagedAdamW``.
* ``hf-stack``: ``bitsandbytes.nn.Linear4bit`` (NF4, double quant) + PEFT ``get_peft_model``;
  transformers' gradient checkpointing (non-reentrant); ``bitsandbytes.optim.PagedAdamW32bit``
  (bitsandbytes falls back to an unpaged AdamW on CPU); the loss from ``model(labels=...)``.

LoRA: r=16, alpha=16, dropout 0.05 on every linear layer but the head (the QLoRA recipe).
Compute dtype: bf16 on CUDA, fp32 on CPU (as the trainer does: no fast 16-bit CPU matmuls).

On CUDA the stacks run one after the other in the same process (a 70B model fits once, not
twice, and each peak must be measured alone). On CPU both are built side by side and timed in
alternating steps, the order rotated each round, so that a busy neighbour on a shared machine
slows both alike; there ours runs its pure-PyTorch reference backend and bitsandbytes its CPU
kernels. The CPU comparison of issue 20 (2 cores, median of 5 steps):

    qlora bench train --model smollm-135m --batch-size 8 --seq-len 64 --steps 5 --device cpu

Each step is timed by the wall clock around a synchronized step, after warm-up steps that
allocate the optimizer states and autotune the kernels. The first step's loss of both stacks is
reported: with B = 0 at initialization both compute the same function on the same bits, so the
two losses must agree to rounding.

Files in ``--out``: bench_train.json / .csv (one row per stack) and bench_train.md.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from torch import nn

from qlora.bench import harness

STACKS = ("qlora", "hf-stack")
RANK, ALPHA, DROPOUT = 16, 16.0, 0.05
LR = 2e-4
WEIGHT_STD = 0.02
QUICK = dict(model="tiny-llama", seq_len=64, batch_size=2, steps=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="architecture preset (see `qlora memory estimate`)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per stack (default 10)")
    harness.add_run_arguments(parser, f"{QUICK['model']}, seq-len {QUICK['seq_len']}, batch {QUICK['batch_size']}, "
                                      f"{QUICK['steps']} steps, on CPU")


def _resolve(args) -> dict:
    settings = harness.option_values(args, QUICK, dict(model=None, seq_len=2048, batch_size=1,
                                                       steps=10))
    if settings["model"] is None:
        raise ValueError("--model PRESET is required (or --quick)")
    harness.require_positive(settings, ("seq_len", "batch_size", "steps"))
    settings["warmup"] = 1 if args.quick else 2
    settings["device"] = str(harness.run_device(args))
    return settings


# ---- the model, one layer at a time ------------------------------------------------------------

def _skeleton(preset: str, dtype: torch.dtype):
    """The preset's causal LM with every parameter on the meta device (buffers real, on CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.model.presets import load_preset

    cfg = load_preset(preset)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> int:
    """Replace the meta parameters of ``module`` with seeded random ones on ``device``: matrices
    N(0, WEIGHT_STD²), vectors (norm weights) ones. Returns the next seed."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if param.dim() >= 2:
                gen = torch.Generator(device=device).manual_seed(seed)
                value = torch.randn(param.shape, generator=gen, device=device, dtype=dtype) * WEIGHT_STD
            else:
                value = torch.ones(param.shape, device=device, dtype=dtype)
            seed += 1
            owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    return seed


def _bnb_quantize_linears(layer: nn.Module) -> None:
    """Replace every nn.Linear of ``layer`` by bitsandbytes' Linear4bit holding the NF4 bits that
    ``qlora.quant.nf4.quantize`` produces (bitsandbytes' format exactly)."""
    import bitsandbytes as bnb

    from qlora.quant.nf4 import quantize

    for owner in list(layer.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is not nn.Linear:
                continue
            state = quantize(child.weight.data).state_dict("weight")
            packed = state.pop("weight")
            stats = {key[len("weight."):]: value for key, value in state.items()}
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=child.weight.dtype, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, device=packed.device, module=new)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(owner, name, new)


def build_model(preset: str, stack: str, device: torch.device, dtype: torch.dtype):
    """The preset with random weights, NF4 linear layers of ``stack``, layer by layer."""
    from qlora.ops.offload import decoder_layers

    model = _skeleton(preset, dtype)
    seed = 0
    for layer in decoder_layers(model):
        seed = _materialize(layer, device, dtype, seed)
        if stack == "qlora":
            from qlora.model.loading import quantize_model

            quantize_model(layer)
        else:
            _bnb_quantize_linears(layer)
    _materialize(model, device, dtype, seed)
    model.tie_weights()
    return model.to(device)


# ---- the two stacks ----------------------------------------------------------------------------

def _qlora_stack(model, device):
    """(loss(input_ids) callable, optimizer, components) of our training step."""
    from qlora.model.inject import add_lora
    from qlora.ops.backend import get_backend
    from qlora.ops.offload import enable_checkpointing
    from qlora.optim import PagedAdamW

    add_lora(model, r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear")
    model.to(device)
    components = ["qlora Linear4bit + LoRA"]
    fused = get_backend(device) in ("triton", "cuda")
    if fused:
        from qlora.model.patch import patch_model

        patch_model(model)
        components.append("fused RMSNorm/SwiGLU/RoPE, chunked cross-entropy")
    enable_checkpointing(model, offload=False)
    components += ["checkpointing", "PagedAdamW"]
    model.train()

    def loss_fn(input_ids):
        if fused:
            from qlora.ops.losses import causal_lm_forward_loss

            return causal_lm_forward_loss(model, input_ids, input_ids)
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    params = [p for p in model.parameters() if p.requires_grad]
    return loss_fn, PagedAdamW(params, lr=LR), ", ".join(components)


def _hf_stack(model, device):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.config.use_cache = False
    peft_model.train()

    def loss_fn(input_ids):
        return peft_model(input_ids=input_ids, labels=input_ids).loss

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=LR)
    return loss_fn, optimizer, "bnb Linear4bit + PEFT LoRA, transformers checkpointing, bnb PagedAdamW32bit"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StackRun:
    """One stack built and ready to step: its model, optimizer and the losses of every step."""

    def __init__(self, stack: str, settings: dict, input_ids: torch.Tensor):
        self.stack, self.input_ids = stack, input_ids
        self.device = torch.device(settings["device"])
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = build_model(settings["model"], stack, self.device, self.dtype)
        self.loss_fn, self.optimizer, self.components = \
            (_qlora_stack if stack == "qlora" else _hf_stack)(self.model, self.device)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.losses, self.times = [], []

    def step(self) -> None:
        loss = self.loss_fn(self.input_ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step()  # .item() synchronizes
        _sync(self.device)
        self.times.append(1000 * (time.perf_counter() - start))

    def result(self, memory: dict) -> dict:
        p50, p20, p80 = harness.quantiles(self.times)
        return dict(stack=self.stack, components=self.components, dtype=str(self.dtype).removeprefix("torch."),
                    trainable_params=self.trainable, step_ms_p50=p50, step_ms_p20=p20, step_ms_p80=p80,
                    tokens_per_s=self.input_ids.numel() / p50 * 1000,
                    peak_allocated_gib=memory.get("peak_allocated_gib"),
                    peak_reserved_gib=memory.get("peak_reserved_gib"),
                    first_loss=self.losses[0], last_loss=self.losses[-1])


def run_stack(stack: str, settings: dict, input_ids: torch.Tensor) -> dict:
    """Build, warm up and time one stack alone on CUDA, with its own peak memory; everything it
    allocated is freed on return."""
    run = StackRun(stack, settings, input_ids)
    for _ in range(settings["warmup"]):
        run.step()
    _sync(run.device)
    torch.cuda.reset_peak_memory_stats(run.device)
    for _ in range(settings["steps"]):
        run.timed_step()
    result = run.result(dict(peak_allocated_gib=torch.cuda.max_memory_allocated(run.device) / 2**30,
                             peak_reserved_gib=torch.cuda.max_memory_reserved(run.device) / 2**30))
    del run
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_interleaved(settings: dict, input_ids: torch.Tensor) -> dict:
    """Both stacks built side by side and timed in alternating steps, the order rotated each
    round: a noisy neighbour or a clock change on a shared CPU then slows both alike, instead of
    whichever stack happened to run at that moment. Used on CPU, where no peak memory is
    measured and both models fit."""
    runs = [StackRun(stack, settings, input_ids) for stack in STACKS]
    for _ in range(settings["warmup"]):
        for run in runs:
            run.step()
    for i in range(settings["steps"]):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            run.timed_step()
    return {run.stack: run.result({}) for run in runs}


def run(args) -> dict:
    with harness.quick_threads(args.quick):
        return _run(args)


def _run(args) -> dict:
    settings = _resolve(args)
    device = torch.device(settings["device"])
    from qlora.model.presets import load_preset

    vocab = load_preset(settings["model"])["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (settings["batch_size"], settings["seq_len"]), generator=gen).to(device)
    command = harness.command_line("qlora bench train", dict(
        model=settings["model"], seq_len=settings["seq_len"], batch_size=settings["batch_size"],
        steps=settings["steps"], device=settings["device"], quick=args.quick, out=args.out))
    env = harness.environment(device, command)
    config = dict(model=settings["model"], seq_len=settings["seq_len"], batch_size=settings["batch_size"],
                  steps=settings["steps"], warmup_steps=settings["warmup"], rank=RANK, alpha=ALPHA,
                  dropout=DROPOUT, lr=LR)
    if device.type == "cuda":
        results = {stack: run_stack(stack, settings, input_ids) for stack in STACKS}
    else:
        results = run_interleaved(settings, input_ids)
    hf = results["hf-stack"]
    rows = []
    for stack, result in results.items():
        row = dict(**env, **config, **result)
        row["speedup_vs_hf_stack"] = hf["step_ms_p50"] / result["step_ms_p50"]
        if result["peak_allocated_gib"] is not None:
            row["memory_ratio_vs_hf_stack"] = result["peak_allocated_gib"] / hf["peak_allocated_gib"]
        rows.append(row)
    out_dir = Path(args.out)
    files = harness.write_rows(rows, out_dir, "bench_train")
    text = markdown(rows, env)
    (out_dir / "bench_train.md").write_text(text, encoding="utf-8")
    return {"rows": rows, "files": [*files, out_dir / "bench_train.md"], "markdown": text}


def markdown(rows: list, env: dict) -> str:
    first = rows[0]
    header = ["stack", "step ms", "tokens/s", "× hf-stack", "peak allocated GiB", "peak reserved GiB",
              "first loss", "last loss", "what runs"]
    table = [[row["stack"], f"{row['step_ms_p50']:.4g} [{row['step_ms_p20']:.4g}, {row['step_ms_p80']:.4g}]",
              harness.fmt(row["tokens_per_s"], 4), harness.fmt(row["speedup_vs_hf_stack"]),
              harness.fmt(row["peak_allocated_gib"]), harness.fmt(row["peak_reserved_gib"]),
              f"{row['first_loss']:.5g}", f"{row['last_loss']:.5g}", row["components"]] for row in rows]
    lines = ["# qlora bench train", "", *harness.environment_lines(env),
             f"- model: {first['model']} (random weights), batch {first['batch_size']} x {first['seq_len']} "
             f"tokens, {first['steps']} timed steps after {first['warmup_steps']} warm-up, LoRA r={first['rank']} "
             f"alpha={first['alpha']:g} dropout={first['dropout']:g} on every linear layer, {first['dtype']}", ""]
    if env["device_type"] != "cuda":
        lines += ["**CPU run**: both stacks on their CPU paths (ours: the pure-PyTorch reference backend), "
                  "timed in alternating steps; it says nothing about GPU speed or memory (peak memory is "
                  "measured on CUDA only).", ""]
    lines += ["step ms: median [20th, 80th percentile]. × hf-stack: its step time / this one (> 1: faster). "
              "The first losses must agree: same weights, same batch, LoRA B = 0.", "",
              harness.markdown_table(header, table), ""]
    return "\n".join(lines)



def main_from_args(args) -> int:
    return harness.print_report(run(args))


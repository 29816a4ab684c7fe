"""The training loop (accelerate): exact token-normalized gradient accumulation, clipping, the
non-finite guards (qlora.train.guard), evaluation, sample answers, metrics and checkpoints, in a
run directory that belongs to this run alone (qlora.train.run_dir).

Loss normalization: an optimizer step covers ``gradient_accumulation_steps`` micro-batches on
each of ``world_size`` processes. The trained tokens of all of them, N, are counted first, and
each micro-batch's loss is (sum of its per-token losses) / N, times world_size because DDP
(and FSDP's reduce-scatter) averages gradients over processes. The step's gradient is then exactly that of the mean loss
over all N tokens, whatever the split into micro-batches and processes — so 4 micro-batches of
1 sequence give the same update as 1 micro-batch of 4 (the per-micro-batch mean that some
trainers accumulate does not).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qlora.ops.backend import get_backend
from qlora.data.batching import BatchStream, collate, single, steps_for_epochs
from qlora.data.formats import IGNORE_INDEX
from qlora.ops.losses import final_logit_transform, head_loss
from qlora.train import checkpoint as ckpt
from qlora.train import fsdp
from qlora.adalora.training import AdaLoRATraining
from qlora.model.inject import trainable_parameters
from qlora.train.config import Config, config_to_dict, dump_config
from qlora.train.dataset import build_data, locate_data, prompt_and_answer
from qlora.train.fingerprint import check_same_data, fingerprint
from qlora.train.guard import NonFiniteLossError, NonFiniteUpdateError, TrainingStopped, all_finite, \
    non_finite_update_message
from qlora.train.metrics import MetricsLog, hyperparameters, memory_used, peak_memory_mib, \
    plot_loss, tracker_values
from qlora.optim.master import master_weights_in_place
from qlora.train.memory_options import apply_memory_options, memory_options
from qlora.train.model import build_model, checked_model_path, load_tokenizer
from qlora.train.optimizer import build_optimizer, build_scheduler
from qlora.train.run_dir import decided_on_main, lock_run_dir, take_over
from qlora.train.trackers import Trackers
from qlora.util.atomic import write_atomic


def _output_head(model) -> nn.Module:
    """The output layer in use: with ``lm_head`` in ``lora.modules_to_save``, the active adapter's
    trainable copy (what the wrapper's forward would run)."""
    from qlora.nn.modules_to_save import ModulesToSaveWrapper

    head = model.get_output_embeddings()
    if not isinstance(head, ModulesToSaveWrapper):
        return head
    if not head.disable_adapters:
        for name in head.active_adapters:
            if name in head.modules_to_save:
                return head.modules_to_save[name]
    return head.original_module


def token_loss(model, input_ids, labels, num_items, attention_mask=None, position_ids=None):
    """The model's summed next-token loss divided by ``num_items``, its logits through the model's
    final-logit transform (Gemma's soft cap, Cohere's scale, ...: see qlora.ops.losses). Labels are
    already shifted (see qlora.data.formats)."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False)
    head = _output_head(model).weight
    return head_loss(out.last_hidden_state.to(head.dtype), head, labels, num_items,
                     transform=final_logit_transform(model.config), ignore_index=IGNORE_INDEX)


class LossModule(nn.Module):
    """:func:`token_loss` as one module, so DDP wraps (and synchronizes) the whole forward. Under
    FSDP the model carries it as a registered forward method (``fsdp.FSDP_LOSS_METHOD``), so that
    the root unit gathers the embeddings and ``lm_head`` around it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, num_items, attention_mask=None, position_ids=None):
        loss = getattr(self.model, fsdp.FSDP_LOSS_METHOD, None) or functools.partial(token_loss, self.model)
        return loss(input_ids, labels, num_items, attention_mask=attention_mask, position_ids=position_ids)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    eval_loss: Optional[float] = None
    sample_before: Optional[str] = None
    sample_after: Optional[str] = None
    exact_match_before: Optional[float] = None  # fraction of the scored held-out examples
    exact_match_after: Optional[float] = None
    trainable_parameters: int = 0
    parameters: int = 0  # all of the model's, an NF4 weight counted as its number of elements
    tokens_per_s: Optional[float] = None  # input tokens (all processes) per second of training steps
    peak_memory_mib: Optional[float] = None  # qlora.train.metrics.peak_memory_mib at the end

    def to_json(self) -> str:
        """What the run writes to result.json at its end (paths as strings)."""
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=2)


def _mixed_precision(cfg: Config) -> str:
    if torch.cuda.is_available() and cfg.quant.compute_dtype == "bfloat16":
        return "bf16"
    return "no"


def _adapter_summary(cfg: Config) -> str:
    lora = cfg.lora
    if lora.type == "adalora":
        return (f"AdaLoRA init_r={lora.init_r} -> target_r={lora.target_r} alpha={lora.alpha:g} "
                f"(scaling alpha/init_r {lora.alpha / lora.init_r:g})")
    text = f"{'DoRA' if lora.type == 'dora' else 'LoRA'} r={lora.r} alpha={lora.alpha:g} " \
           f"(scaling {lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r):g})"
    if lora.modules_to_save:
        text += f", trained in full: {', '.join(lora.modules_to_save)}"
    return text


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples, micro_batch_size: int, pad_id: int, device) -> float:
    """Mean loss per trained token over ``examples``."""
    loss_module = LossModule(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        rows = [single(e) for e in examples[start:start + micro_batch_size]]
        batch = _batch_to(collate(rows, pad_id, packed=False), device)
        total += float(loss_module(batch["input_ids"], batch["labels"], 1,
                                   attention_mask=batch["attention_mask"]))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, streamer=None) -> str:
    """Greedy continuation of ``prompt_ids`` (uses no random numbers); ``streamer``
    (qlora.data.streaming.TextStreamer) gets the tokens as they are generated."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = model.generate(torch.tensor([prompt_ids], device=device), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id, streamer=streamer,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device))
    model.train(was_training)
    return tokenizer.decode(ids[0, len(prompt_ids):].tolist())


@torch.no_grad()
def exact_match(model, tokenizer, examples) -> int:
    """How many of ``examples`` the model answers exactly: greedy decoding from the prompt
    gives the trained answer and then stops (at EOS, or the answer's length plus one token, so
    an answer that runs on counts as wrong)."""
    hits = 0
    for example in examples:
        prompt, answer = prompt_and_answer(example)
        hits += generate(model, tokenizer, prompt, len(answer) + 1) == tokenizer.decode(answer)
    return hits


def scored_examples(held_out: list, limit: int) -> list:
    """The first ``limit`` held-out examples that have an answer to score (truncation can cut
    it when the prompt is trained too)."""
    return [e for e in held_out if e.answer_len][:limit]


def _sample_prompt(cfg: Config, tokenizer, held_out) -> tuple[list[int], Optional[str]]:
    """(prompt ids, expected answer or None) for the before/after sample."""
    from qlora.data.formats import prompt_ids

    text = cfg.logging.sample_prompt
    if text is None and held_out:
        prompt, answer = prompt_and_answer(held_out[0])
        return prompt, tokenizer.decode(answer)
    if text is None:
        return [], None
    return prompt_ids(tokenizer, text, cfg.data.format), None


def _publish_adapter(save_fn, target: Path) -> None:
    """Write the final adapter to ``target`` with ``save_fn(dir)`` without ever leaving it
    half-written."""
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed in the middle of this
    save_fn(tmp)
    ckpt.fsync_tree(tmp)
    if target.exists():
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def _patch_fused_kernels(model, device) -> dict:
    """model.fused_kernels: the fused element-wise kernels of qlora.model.patch, which are Triton-only."""
    from qlora.model.patch import patch_model

    backend = get_backend(device)
    if backend not in ("triton", "cuda"):
        raise ValueError(f"model.fused_kernels: true needs the triton or cuda backend; this run uses "
                         f"{backend!r} (QLORA_BACKEND, or no CUDA device)")
    try:
        return patch_model(model)
    except ValueError as err:
        raise ValueError(f"model.fused_kernels: {err}") from None


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, out=None, plan=None, *,
                 overwrite: bool = False, allow_changed_data: bool = False):
        """``resume``: None, ``"latest"`` or a checkpoint directory; ``plan``: the memory plan
        (qlora.memory.plan) whose optimizer budget the run uses; ``overwrite``: replace a
        previous run's outputs in ``train.output_dir``; ``allow_changed_data``: resume even if
        the data files differ from the checkpoint's (qlora.train.fingerprint)."""
        self.run_lock = None
        try:
            self._setup(cfg, resume, out, plan, overwrite, allow_changed_data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release ``train.output_dir`` for other runs."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _setup(self, cfg: Config, resume: Optional[str], out, plan, overwrite: bool,
               allow_changed_data: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg = copy.deepcopy(cfg)  # train.max_steps follows train.num_epochs
        self.out = out or sys.stdout
        self.output_dir = Path(cfg.train.output_dir)
        # the model's config.json is checked and the data found, read and tokenized before the
        # model loads: a wrong model or bad data fails in seconds
        checked_model_path(cfg)
        sources = locate_data(cfg)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        self.trackers = Trackers(cfg, self.output_dir)
        self.acc = Accelerator(cpu=not torch.cuda.is_available(),
                               mixed_precision=_mixed_precision(cfg),
                               log_with=self.trackers.log_with or None, project_dir=str(self.output_dir))
        self.world = self.acc.num_processes
        set_seed(cfg.train.seed)
        self.data = build_data(cfg, self.tokenizer, sources)
        self.log(self.data.summary())
        if cfg.train.num_epochs is not None:
            cfg.train.max_steps = steps_for_epochs(len(self.data.train),
                                                   cfg.train.micro_batch_size * self.world,
                                                   cfg.train.gradient_accumulation_steps,
                                                   cfg.train.num_epochs)
            self.log(f"train.num_epochs={cfg.train.num_epochs:g}: {cfg.train.max_steps} optimizer steps")
        # the directory is claimed once the data is known good: bad data leaves a previous run alone
        self.data_files, self.metrics = {}, None
        self.resumed_from = decided_on_main(
            self.acc, lambda: self._claim_output_dir(resume, overwrite, allow_changed_data))
        # an AdaLoRA run resumes from its unpruned weights (see qlora.adalora.training), not the
        # PEFT adapter
        adapter_dir = None if self.resumed_from is None or cfg.lora.type == "adalora" \
            else self.resumed_from / "adapter"
        self.model = build_model(cfg, self.acc.device, adapter_dir)
        self.plan = plan  # qlora.memory.plan.MemoryPlan from `qlora train`, or None
        if cfg.model.fused_kernels:
            self.patched = _patch_fused_kernels(self.model, self.acc.device)
        # after the fused kernels, which replace module forwards outright: the memory options
        # wrap whichever forward they find
        self.memory_notes = apply_memory_options(self.model, **memory_options(cfg))
        self.adalora = AdaLoRATraining(self.model, cfg.lora, cfg.train.max_steps) if cfg.lora.type == "adalora" else None
        if cfg.model.gradient_checkpointing:
            from qlora.ops.offload import enable_checkpointing

            enable_checkpointing(self.model, offload=cfg.model.offload_activations)
        self.model.train()
        self.fsdp_plan = self._shard() if fsdp.fsdp_requested() else None
        # after sharding: under FSDP the optimizer updates each process's shards
        self.optimizer = build_optimizer(
            self.model, cfg, gpu_budget_bytes=plan.optimizer_budget_bytes if plan else None)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.state = ckpt.TrainerState(world_size=self.world)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self.saved_step = self.state.step if self.resumed_from is not None else None
        self.stream = BatchStream([len(r) for r in self.data.train],
                                  cfg.train.micro_batch_size * self.world, cfg.train.seed,
                                  cfg.data.group_by_length and not cfg.data.packing,
                                  position=self.state.data_position)
        # the FSDP-sharded model synchronizes itself; accelerate wraps only an unsharded one (DDP)
        self.loss_module = LossModule(self.model) if self.fsdp_plan else self.acc.prepare(LossModule(self.model))
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _shard(self) -> list[str]:
        """Shard the model with FSDP2 (see qlora.train.fsdp); returns the memory plan to print."""
        layer_class = type(fsdp.decoder_layers(self.model)[0]).__name__
        settings = fsdp.fsdp_settings(self.cfg, self.world, layer_class)
        before = fsdp.held_bytes(self.model)
        layer_bytes = sum(fsdp.held_bytes(fsdp.decoder_layers(self.model)[0]).values())
        fsdp.shard_model(self.model, self.world, settings, loss=functools.partial(token_loss, self.model))
        after = [None] * self.world
        torch.distributed.all_gather_object(after, fsdp.held_bytes(self.model))
        return fsdp.memory_plan_lines(before, after, layer_bytes)

    def _whole_model(self):
        """All processes enter: under FSDP the parameters are gathered while inside."""
        return fsdp.gathered(self.model) if self.fsdp_plan else contextlib.nullcontext()

    def _optimizer_state(self) -> dict:
        """The optimizer state to checkpoint (all processes call it: under FSDP it gathers)."""
        if self.fsdp_plan:
            return fsdp.full_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    # ---- output --------------------------------------------------------------------------
    def record(self, metrics: Optional[MetricsLog], record: dict) -> None:
        """One metrics record: to the JSONL on the main process, and to the trackers."""
        if metrics is not None:
            metrics.write(record)
        if self.cfg.logging.report_to:
            self.acc.log(tracker_values(record), step=record["step"])

    def log(self, text: str) -> None:
        if self.acc.is_main_process:
            from tqdm import tqdm

            tqdm.write(text, file=self.out)

    # ---- the run directory and resume ----------------------------------------------------
    def _claim_output_dir(self, resume: Optional[str], overwrite: bool,
                          allow_changed_data: bool) -> Optional[Path]:
        """On the main process: lock ``train.output_dir``, find the checkpoint to resume and
        check it (config, data files), and make the directory this run's. Returns the
        checkpoint or None."""
        self.run_lock = lock_run_dir(self.output_dir)
        path = self._find_checkpoint(resume) if resume else None
        self.data_files = fingerprint(self.cfg)
        if path is not None:
            check_same_data(path, self.data_files, allow_changed_data, self.log)
        take_over(self.output_dir, path, overwrite, self.log)
        return path

    def _find_checkpoint(self, resume: str) -> Path:
        if resume == "latest":
            path = ckpt.latest_checkpoint(str(self.output_dir))
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint under "
                                        f"{ckpt.checkpoints_root(str(self.output_dir))}")
        else:
            path = Path(resume)
        ckpt.check_compatible(path, self.cfg, self.world)
        return path

    def _restore(self, path: Path) -> None:
        """Optimizer, scheduler, counters and RNG states of checkpoint ``path`` (the adapter was
        loaded with the model)."""
        optimizer_state = ckpt.read_torch(path / "optimizer.pt")
        if self.fsdp_plan:
            fsdp.load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(ckpt.read_torch(path / "scheduler.pt"))
        self.state = ckpt.read_trainer_state(path)
        ckpt.set_rng_state(ckpt.read_torch(path / f"rng-rank{self.acc.process_index}.pt"))
        if self.adalora is not None:
            self.adalora.restore(path)

    def save_adapter(self, path: Path) -> None:
        """The adapter in PEFT's format (AdaLoRA: with its rank pattern, masked triplets left out),
        from the optimizer's fp32 masters where it keeps them."""
        with master_weights_in_place(self.optimizer):
            if self.adalora is not None:
                self.adalora.save_adapter(path)
            else:
                from qlora.model.adapters import save_adapter

                save_adapter(self.model, str(path))

    def save_checkpoint(self) -> None:
        step = self.state.step
        root = ckpt.checkpoints_root(str(self.output_dir))
        if step == self.saved_step:
            return  # written already, or the checkpoint this run resumed from: never rewritten
        if self.metrics is not None:
            self.state.metrics_lines = self.metrics.lines
        if self.acc.is_main_process:
            tmp = ckpt.new_temp_dir(str(self.output_dir), step)
        self.acc.wait_for_everyone()
        tmp = root / f".tmp-step-{step}"
        ckpt.write_rng(tmp, self.acc.process_index)
        optimizer_state = self._optimizer_state()
        self.acc.wait_for_everyone()
        with self._whole_model():
            if self.acc.is_main_process:
                ckpt.write_checkpoint_files(tmp, cfg=self.cfg, state=self.state,
                                            optimizer_state=optimizer_state, scheduler=self.scheduler,
                                            save_adapter_fn=self.save_adapter,
                                            data_files=self.data_files)
                if self.adalora is not None:
                    self.adalora.write_state(tmp)
                ckpt.publish(tmp, step, self.cfg.checkpoint.keep)
            self.saved_step = step
            self.acc.wait_for_everyone()

    # ---- one optimizer step --------------------------------------------------------------
    def _micro_batches(self) -> list[dict]:
        """This process's share of the next ``gradient_accumulation_steps`` micro-batches."""
        mb, rank = self.cfg.train.micro_batch_size, self.acc.process_index
        out = []
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            indices = self.stream.next()[rank * mb:(rank + 1) * mb]
            rows = [self.data.train[i] for i in indices]
            out.append(_batch_to(collate(rows, self.tokenizer.pad_id, self.cfg.data.packing),
                                 self.acc.device))
        return out

    def _all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum"))

    def train_step(self) -> dict:
        batches = self._micro_batches()
        n_trained = self._all_sum(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))
        n_inputs = self._all_sum(sum(int(b["input_ids"].numel()) for b in batches))
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.loss_module)
            with sync, self.acc.autocast():
                loss = self.loss_module(batch["input_ids"], batch["labels"], n_trained,
                                        attention_mask=batch.get("attention_mask"),
                                        position_ids=batch.get("position_ids"))
                total = loss
                if self.adalora is not None:  # the penalty once per optimizer step
                    total = loss + self.adalora.regularization() / len(batches)
                self.acc.backward(total * self.world)
            loss_sum += float(loss.detach())
        loss_value = self._all_sum(loss_sum)
        max_norm = self.cfg.train.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.adalora is not None:
                self.adalora.after_step(self.state.step)
            if not all_finite(self.params):
                latest = ckpt.latest_checkpoint(str(self.output_dir))
                raise NonFiniteUpdateError(non_finite_update_message(
                    self.state.step + 1, loss_value, grad_norm, lr, latest and str(latest)))
            self.state.bad_steps_in_a_row = 0
        else:
            self.state.bad_steps_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.data_position = self.stream.position
        self.state.tokens_seen += int(n_inputs)
        return dict(step=self.state.step, loss=loss_value, lr=lr, grad_norm=grad_norm,
                    trained_tokens=int(n_trained), skipped=not finite)

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        n_params = sum(p.numel() for p in self.params)
        self.log(f"model: {cfg.model.name_or_path}, {_adapter_summary(cfg)}, "
                 f"{n_params:,} trainable parameters; device {acc.device}, {self.world} process(es), "
                 f"{'NF4 base' if cfg.quant.enabled else 'dense base'}")
        for line in self.fsdp_plan or []:
            self.log(line)
        if self.plan is not None:
            self.log(self.plan.text())
        for line in self.memory_notes:
            self.log(f"memory: {line}")
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} at step {self.state.step}")
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(cfg))
        metrics = MetricsLog(self.output_dir / "metrics.jsonl", self.state.metrics_lines) \
            if acc.is_main_process else None
        self.metrics = metrics
        self.trackers.start(acc, hyperparameters(config_to_dict(cfg)),
                            self.state.step if self.resumed_from is not None else None)
        try:
            return self._run(metrics)
        finally:
            for tracker in acc.trackers:
                tracker.finish()
            self.close()

    def _run(self, metrics: Optional[MetricsLog]) -> TrainResult:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.acc
        result = TrainResult(self.output_dir, self.output_dir / "adapter", self.state.step)
        counts = trainable_parameters(self.model)
        result.trainable_parameters, result.parameters = counts.trainable, counts.total
        prompt_ids, expected = _sample_prompt(cfg, self.tokenizer, self.data.eval)
        self.sample_prompt_ids = prompt_ids
        if prompt_ids and self.resumed_from is None:
            result.sample_before = self._sample()
            self.log(f"prompt:          {self.tokenizer.decode(prompt_ids)!r}")
            if expected is not None:
                self.log(f"expected answer: {expected!r}")
            self.log(f"answer before:   {result.sample_before!r}")
        if self._scored_examples() and self.resumed_from is None:
            result.exact_match_before = self._exact_match()
            self.log(f"held-out exact match before: {self._format_match(result.exact_match_before)}")

        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, desc="train",
                   disable=not (acc.is_main_process and cfg.logging.progress_bar),
                   dynamic_ncols=True, file=sys.stderr)
        tick, tick_tokens = time.perf_counter(), self.state.tokens_seen
        start_tokens, step_seconds = self.state.tokens_seen, 0.0
        while self.state.step < cfg.train.max_steps:
            started = time.perf_counter()
            try:
                record = self.train_step()
            except TrainingStopped:
                bar.close()
                raise
            step_seconds += time.perf_counter() - started
            if record["skipped"]:
                self.log(f"step {record['step']}: non-finite loss {record['loss']} or gradient norm "
                         f"{record['grad_norm']}; step skipped "
                         f"({self.state.bad_steps_in_a_row} in a row)")
                if self.state.bad_steps_in_a_row >= cfg.train.max_bad_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"{self.state.bad_steps_in_a_row} non-finite steps in a row (train.max_bad_steps"
                        f"={cfg.train.max_bad_steps}) up to step {self.state.step}: lower optim.lr, "
                        f"check the data, or use quant.compute_dtype: bfloat16 instead of float16")
            now = time.perf_counter()
            record["tokens_per_s"] = (self.state.tokens_seen - tick_tokens) / max(now - tick, 1e-9)
            record["memory"] = memory_used(acc.device)
            tick, tick_tokens = now, self.state.tokens_seen
            bar.set_postfix_str(f"loss={record['loss']:.3f} lr={record['lr']:.2e} "
                                f"tok/s={record['tokens_per_s']:.0f} mem={record['memory']}")
            bar.update(1)
            step = self.state.step
            if step % cfg.logging.every == 0 or step == cfg.train.max_steps:
                self.record(metrics, record)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps \
                    and self.data.eval:
                self._eval(metrics, step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        bar.close()

        result.steps = self.state.step
        if step_seconds:
            result.tokens_per_s = (self.state.tokens_seen - start_tokens) / step_seconds
        result.peak_memory_mib = peak_memory_mib(acc.device)
        if self.adalora is not None:
            self.adalora.fix_final_ranks()  # evaluated and sampled with the final ranks
        # before the final evaluation: a run resumed from this checkpoint (killed while
        # publishing, or continued to more steps) logs that evaluation again, and only once
        self.save_checkpoint()
        if self.data.eval:
            result.eval_loss, result.exact_match_after = self._eval(metrics, self.state.step,
                                                                    sample=False)
        if self.adalora is not None:
            self.adalora.prune(self.output_dir, self.log, acc.is_main_process)
        if prompt_ids:
            result.sample_after = self._sample()
            self.log(f"answer after:    {result.sample_after!r}")
        if result.exact_match_after is not None:
            self.log(f"held-out exact match after: {self._format_match(result.exact_match_after)}")
        with self._whole_model():
            if acc.is_main_process:
                _publish_adapter(self.save_adapter, result.adapter_dir)
            acc.wait_for_everyone()
        if acc.is_main_process:
            self.log(f"adapter (PEFT format): {result.adapter_dir}")
            write_atomic(self.output_dir / "result.json", lambda f: f.write(result.to_json().encode()))
            if cfg.logging.loss_plot:
                plot_loss(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")
                self.log(f"loss curve: {self.output_dir / 'loss.png'}")
        acc.wait_for_everyone()
        return result

    # ---- evaluation ----------------------------------------------------------------------
    def _sample(self) -> str:
        with self.acc.autocast():
            return generate(self.model, self.tokenizer, self.sample_prompt_ids,
                            self.cfg.logging.sample_max_new_tokens)

    def _scored_examples(self) -> list:
        return scored_examples(self.data.eval, self.cfg.logging.exact_match_examples)

    def _exact_match(self) -> float:
        scored = self._scored_examples()
        with self.acc.autocast():
            return exact_match(self.model, self.tokenizer, scored) / len(scored)

    def _format_match(self, fraction: float) -> str:
        n = len(self._scored_examples())
        return f"{round(fraction * n)}/{n} ({100 * fraction:.0f}%)"

    def _eval(self, metrics, step: int, sample: bool = True) -> tuple[float, Optional[float]]:
        """Held-out loss and perplexity, exact match on the first ``logging.exact_match_examples``
        held-out examples, and (``sample``) the sample prompt's answer: logged and written to
        the metrics. Returns (loss, exact-match fraction or None)."""
        with self.acc.autocast():
            loss = evaluate(self.model, self.data.eval, self.cfg.train.micro_batch_size,
                            self.tokenizer.pad_id, self.acc.device)
        ppl = math.exp(min(loss, 50.0))
        record = dict(step=step, eval_loss=loss, eval_ppl=ppl)
        text = f"step {step}: held-out loss {loss:.4f}, perplexity {ppl:.2f}"
        if self._scored_examples():
            record["eval_exact_match"] = self._exact_match()
            text += f", exact match {self._format_match(record['eval_exact_match'])}"
        if sample and self.sample_prompt_ids:
            record["sample"] = self._sample()
            text += f", sample answer {record['sample']!r}"
        self.log(text)
        self.record(metrics, record)
        return loss, record.get("eval_exact_match")


def train(cfg: Config, resume: Optional[str] = None, out=None, plan=None, *, overwrite: bool = False,
          allow_changed_data: bool = False) -> TrainResult:
    """Run training as configured; ``resume``: None, ``"latest"`` or a checkpoint directory;
    ``plan``: the memory plan (qlora.memory.plan) whose optimizer budget the run uses (the other
    arguments: see :class:`Trainer`)."""
    return Trainer(cfg, resume, out, plan, overwrite=overwrite,
                   allow_changed_data=allow_changed_data).run()

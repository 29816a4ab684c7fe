"""Text tables, JSON dicts and plots of memory estimates and profiles (GB = 10^9 bytes)."""
from qlora.memory.estimate import GB, PHASES, Estimate


def gb(n: int) -> str:
    return f"{n / GB:.3f}"


def estimate_dict(est: Estimate, comparison_rows: list, fit: dict, gpu_bytes: int) -> dict:
    """JSON-ready form of an estimate and the blocks printed with it (bytes as integers)."""
    arch, setup = est.architecture, est.setup
    return {
        "architecture": vars(arch),
        "setup": {**vars(setup), "targets": list(setup.targets)},
        "params": {**vars(est.params), "base_total": est.params.base_total},
        "components": [{**vars(c), "phases": list(c.phases)} for c in est.components],
        "phase_gpu_bytes": {phase: est.phase_bytes(phase) for phase in PHASES},
        "peak_phase": est.peak_phase,
        "total_gpu_bytes": est.gpu_bytes,
        "total_host_bytes": est.host_bytes,
        "gpu_budget_bytes": gpu_bytes,
        "fits": est.gpu_bytes <= gpu_bytes,
        "largest_fit": fit,
        "comparison": comparison_rows,
    }


def _phases(phases: tuple) -> str:
    if tuple(phases) == PHASES:
        return "all"
    return "+".join({"forward": "fwd", "backward": "bwd", "optimizer": "opt"}[p] for p in phases)


def estimate_table(est: Estimate, comparison_rows: list, fit: dict, gpu_bytes: int) -> str:
    """The human-readable estimate: components with the phases they are alive in, the peak of
    each phase, fit, largest fit, method comparison."""
    s = est.setup
    ckpt = "on" + (", offloaded" if s.offload_checkpoints else "") if s.grad_checkpointing else "off"
    options = [name for name, on in (("chunked loss", s.chunked_loss),
                                     (f"tiled MLP {s.tiled_mlp}", s.tiled_mlp),
                                     (f"tiled q/k/v {s.tiled_qkv}", s.tiled_qkv),
                                     ("compact norms", s.compact_norms),
                                     ("embedding on host", s.embedding_on_host),
                                     ("16-bit LoRA + fp32 masters", s.master_weights)) if on]
    lines = [f"QLoRA memory estimate: {est.architecture.model_type}, "
             f"{est.params.base_total / 1e9:.2f}B params, seq_len {s.seq_len} x batch "
             f"{s.batch_size}, rank {s.rank}, {s.optimizer}, checkpointing {ckpt}"
             + "".join(f", {o}" for o in options)
             + (f"; per GPU, FSDP2 over {s.gpus} GPUs" if s.gpus > 1 else ""),
             "", f"{'component':<26}{'GB':>10}  {'where':<5} {'alive':<8} formula"]
    for c in est.components:
        lines.append(f"{c.name:<26}{gb(c.bytes):>10}  {c.device:<5} {_phases(c.phases):<8} "
                     f"{c.formula}")
    for phase in PHASES:
        lines.append(f"{'peak of the ' + phase:<26}{gb(est.phase_bytes(phase)):>10}  gpu")
    lines += [f"{'total on GPU (peak)':<26}{gb(est.gpu_bytes):>10}  ({est.peak_phase})",
              f"{'total on host':<26}{gb(est.host_bytes):>10}", ""]
    verdict = "fits" if est.gpu_bytes <= gpu_bytes else "does NOT fit"
    lines.append(f"{verdict} in {gb(gpu_bytes)} GB; besides the optimizer's pages the step needs "
                 f"{gb(est.gpu_bytes - est.bytes_of('optimizer states'))} GB on the GPU")
    lines.append(f"largest seq_len at batch {fit['at_batch_size']}: {fit['max_seq_len']}; "
                 f"largest batch at seq_len {fit['at_seq_len']}: {fit['max_batch_size']}")
    lines += ["", f"{'same model, same seq_len x batch, 1 GPU':<41}{'ckpt GB':>10}{'no ckpt GB':>12}"]
    for row in comparison_rows:
        lines.append(f"{row['method']:<41}{gb(row['with_checkpointing']):>10}"
                     f"{gb(row['without_checkpointing']):>12}")
    return "\n".join(lines)


def max_context_table(rows: list, source: str, budget: int, setup) -> str:
    """The --max-context ladder: each option, the longest sequence with it and those above, the
    tokens it added, and the longest sequence with every option but it."""
    lines = [f"longest sequence at batch 1 in {gb(budget)} GB: {source}, rank {setup.rank}, "
             f"{setup.optimizer}, compute {8 * setup.compute_bytes}-bit",
             "", f"{'option (added in this order)':<52}{'max seq_len':>12}{'gained':>10}"
                 f"{'without it':>12}"]
    for row in rows:
        gained = "" if row["gained"] is None else f"{row['gained']:+d}"
        without = "" if row["without"] is None else str(row["without"])
        lines.append(f"{row['option']:<52}{row['max_seq_len']:>12}{gained:>10}{without:>12}")
    lines.append("")
    lines.append(f"best: {rows[-1]['max_seq_len']} tokens with every option above")
    return "\n".join(lines)


def comparison_table(rows: list) -> str:
    """Estimate vs measured per component, rows {name, estimate, measured} in bytes."""
    lines = [f"{'component':<26}{'estimate GB':>13}{'measured GB':>13}{'rel. error':>12}"]
    for row in rows:
        err = relative_error(row["estimate"], row["measured"])
        err_text = "n/a" if err is None else f"{100 * err:+.1f}%"
        lines.append(f"{row['name']:<26}{row['estimate'] / GB:>13.6f}{row['measured'] / GB:>13.6f}"
                     f"{err_text:>12}")
    return "\n".join(lines)


def relative_error(estimate: int, measured: int):
    """(estimate - measured) / measured, or None when nothing was measured."""
    return None if measured == 0 else (estimate - measured) / measured


def plot_timeline(samples: list, phases: list, path: str, title: str) -> None:
    """Allocated bytes vs time with phase boundaries. samples: [(t_s, bytes)]; phases:
    [(name, t_start_s, t_end_s)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([t for t, _ in samples], [b / 2**20 for _, b in samples], lw=1)
    colors = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green"}
    for name, start, end in phases:
        kind = name.split()[0]
        ax.axvspan(start, end, alpha=0.15, color=colors.get(kind, "tab:gray"))
        ax.text(start, ax.get_ylim()[1], name, rotation=90, va="top", fontsize=7)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("allocated (MiB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_breakdown(rows: list, path: str, title: str) -> None:
    """Side-by-side bars of estimate and measured bytes per component."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([x - 0.2 for x in xs], [r["estimate"] / 2**20 for r in rows], width=0.4, label="estimate")
    ax.bar([x + 0.2 for x in xs], [r["measured"] / 2**20 for r in rows], width=0.4, label="measured")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

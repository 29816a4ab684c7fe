"""The first GPU run (issue 27): check and measure everything in one device call of about 9 minutes.

On the H200 of shared/GPU.md (Python 3.12, torch 2.11, Triton 3.6, bitsandbytes carried as a
wheel) the steps run one after another, each in child processes with its own time budget:

    env        nvidia-smi, nvcc / ncu / compute-sanitizer / cuobjdump versions, package versions, `qlora info`
    extension  the csrc/ extension (qlora._C) built just in time, with its build time
    tests      the CUDA tests of kernels/, csrc/ and the fused ops, stopped at the first failure (-x)
    kernels    `qlora bench kernels`: Llama-2-7B linear shapes, M 1/16/4096, r 16, fwd and bwd, every provider,
               with the speed model's predicted time where the command's rows carry it
    train      `qlora bench train --model llama-2-7b --seq-len 2048 --steps 5`: ours against the HF stack

Each child's output streams into ``<out>/<step>.log`` as it comes, ``<out>/summary.json`` is rewritten
after every step (status, seconds, test counts and the first failure, measured times, tokens/s, peak
memory, issue 27's targets), and a line per step goes to stdout and ``<out>/gpu_check.log``; a timeout
or a crash therefore keeps everything done before it. An unused part of a step's budget goes to the
steps after it; each later step keeps its own full budget.

The device call (the `run` tool, carry [".whl"], timeout_s 560; prepare .whl once as
shared/GPU.md says). QLORA_BUILD_CUDA=0 keeps the editable install from compiling csrc/ before the
clock starts: the extension step builds it. PYTHONPATH holds the bitsandbytes wheel only: the
repository root on it would let ``kernels/`` shadow Hugging Face's ``kernels`` package:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && QLORA_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1; python3 benchmarks/gpu_check.py --out "$OUT"

Afterwards commit what came back (the files under the tool's files_at) as
``benchmarks/results/<date>-h200-gpu-check/``: gpu_check.log (the driver's log), env.log,
extension.log, tests.log, kernels.log, train.log (raw output), summary.json, versions.json,
command.txt and everything under kernels/ and train/ (what the two bench commands wrote).

``--dry-run`` runs the same steps with the same code on CPU with tiny sizes (CUDA hidden, Triton in
its interpreter; CUDA-only tests skip, with the reason recorded), so that the GPU call cannot fail on
a typo; tests/benchmarks/test_gpu_check.py runs it.

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from qlora.util.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]

RUN_COMMAND = (
    'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl'
    ' && export PYTHONPATH=/tmp/site'
    ' && QLORA_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1;'
    ' python3 benchmarks/gpu_check.py --out "$OUT"')

# Children run Python with the repository root removed from sys.path (``-c`` puts the working
# directory first): there ``kernels/`` would shadow Hugging Face's ``kernels`` package, which
# bitsandbytes probes for. qlora itself comes from the installed (editable) package.
_CLEAN_PATH = "import os, sys; sys.path = [p for p in sys.path if os.path.abspath(p or '.') != os.getcwd()]; "
QLORA_MAIN = _CLEAN_PATH + "from qlora.cli import main; sys.exit(main(sys.argv[1:]))"
PYTEST_MAIN = _CLEAN_PATH + "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
VERSIONS_PROBE = _CLEAN_PATH + """import json, torch
from qlora.bench import harness
info = dict(harness.versions(), torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\\n")
"""
EXTENSION_BUILD = _CLEAN_PATH + """import json, time
from qlora.ops import cuda_ext
start = time.monotonic()
available = cuda_ext.is_available()  # JIT-compiles csrc/ on a CUDA machine
result = dict(available=available, status=cuda_ext.status(), seconds=time.monotonic() - start)
print(result["status"])
open(sys.argv[1], "w").write(json.dumps(result, indent=2) + "\\n")
"""
PROGRAMS = {"qlora": QLORA_MAIN, "pytest": PYTEST_MAIN, "versions-probe": VERSIONS_PROBE,
            "extension-build": EXTENSION_BUILD}


def python(program: str, *args) -> list:
    """The argv of a child Python running ``PROGRAMS[program]`` with ``args``."""
    return [sys.executable, "-c", PROGRAMS[program], *args]


TOOLS = ("nvcc", "ncu", "compute-sanitizer", "cuobjdump")
NVIDIA_SMI_QUERY = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"

# The CUDA tests in the order they run: the csrc/ extension's, the Triton kernels' (CI runs them in
# Triton's interpreter; their AOT compile test is left out: it needs no GPU), the two CUDA tests of
# the optimizer and the activation offload, then the fused ops' 216-case grid, which autotunes per
# shape and may not finish within the budget (what ran is counted).
CSRC_TESTS = "tests/csrc/test_cuda.py"
SINGLE_CUDA_TESTS = ("tests/optim/test_paged_adamw.py::test_auto_budget_on_cuda_runs_and_reports",
                     "tests/ops/test_offload.py::test_offload_on_cuda_matches_and_keeps_activations_off_the_device")
GPU_TESTS = (CSRC_TESTS, "tests/kernels", "--ignore=tests/kernels/test_aot_elementwise.py", *SINGLE_CUDA_TESTS,
             "tests/ops/test_fused_cuda.py")
PYTEST_OPTIONS = ("-x", "-v", "-rs", "-p", "no:warnings", "-p", "no:cacheprovider", "--durations=10")


@dataclass(frozen=True)
class Plan:
    """What one run measures and how long each step may take: FULL on the GPU, DRY on CPU."""

    budgets_s: dict  # step name -> seconds
    tests: tuple  # pytest arguments
    kernels: tuple  # `qlora bench kernels` arguments (--out added)
    train: tuple  # `qlora bench train` arguments (--out added)


# 520 s in all, so that with the two pip installs (about 20 s) the call ends inside the tool's 560 s.
# Estimates (nothing of ours has run on a GPU): the extension compiles torch_bindings.cpp against
# torch's headers (about a minute) beside two .cu files; tests, kernels and train compile and autotune
# Triton kernels on first use, and Triton's on-disk cache carries compiled kernels to the next step.
FULL = Plan(
    budgets_s=dict(env=20, extension=120, tests=100, kernels=130, train=150),
    tests=GPU_TESTS,
    kernels=("--shapes", "llama-2-7b", "--m", "1,16,4096", "--rank", "16", "--mode", "fwd,bwd",
             "--rounds", "3", "--device", "cuda"),
    train=("--model", "llama-2-7b", "--seq-len", "2048", "--batch-size", "1", "--steps", "5", "--device", "cuda"),
)

# The same flags with tiny values; --quick only shortens the CPU timers and warm-up, on one thread
# (every size is explicit), and --nk replaces the preset's shapes by one small one. Budgets are
# generous: a shared CPU is slow.
DRY = Plan(
    budgets_s=dict(env=300, extension=300, tests=600, kernels=600, train=600),
    tests=(CSRC_TESTS, *SINGLE_CUDA_TESTS),
    kernels=("--quick", "--shapes", "custom", "--nk", "128x64", "--m", "1,32", "--rank", "4", "--mode", "fwd,bwd",
             "--rounds", "1", "--device", "cpu"),
    train=("--quick", "--model", "tiny-llama", "--seq-len", "32", "--batch-size", "1", "--steps", "1",
           "--device", "cpu"),
)

STEPS = ("env", "extension", "tests", "kernels", "train")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """One gpu_check run: where it writes, its plan, its clock and the summary built so far."""

    out: Path
    plan: Plan
    dry_run: bool
    start: float = field(default_factory=time.monotonic)
    summary: dict = field(default_factory=dict)

    def child_env(self) -> dict:
        """Unbuffered output, so that a killed child's last lines are in its log; no Hugging Face Hub
        calls (the GPU machine has no network); on a dry run, no CUDA and Triton in its interpreter."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if self.dry_run:
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        return env

    def step_deadline(self, step: str) -> float:
        """Monotonic time by which ``step`` must end: its budget plus what earlier steps left unused."""
        later = STEPS[STEPS.index(step) + 1:]
        total = sum(self.plan.budgets_s.values())
        return self.start + total - sum(self.plan.budgets_s[s] for s in later)

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.out / "gpu_check.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def save(self) -> None:
        text = json.dumps(self.summary, indent=2) + "\n"
        write_atomic(self.out / "summary.json", lambda f: f.write(text.encode("utf-8")))


def run_logged(argv: list, log_path: Path, deadline: float, env: dict) -> dict:
    """Run ``argv`` in the repository root with stdout and stderr appended to ``log_path`` as they
    come; at ``deadline`` (monotonic) kill its whole process group (nvcc, ninja, pytest's children).
    Returns {"command", "rc", "seconds", "timed_out"} (rc None when killed); the command names a
    ``python()`` child by its program's name."""
    argv = [str(a) for a in argv]
    shown = argv
    if argv[1:2] == ["-c"] and argv[2] in PROGRAMS.values():
        shown = [next(name for name, code in PROGRAMS.items() if code == argv[2]), *argv[3:]]
    start = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(shown)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(deadline - start, 0.1)), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            proc.wait()
            rc, timed_out = None, True
        seconds = time.monotonic() - start
        if timed_out:
            log.write(f"\n[gpu_check: killed after {seconds:.0f} s, the step's time budget]\n".encode())
    return dict(command=shlex.join(shown), rc=rc, seconds=round(seconds, 1), timed_out=timed_out)


def _status(record: dict) -> str:
    if record["timed_out"]:
        return "timed out"
    return "ok" if record["rc"] == 0 else f"failed (exit {record['rc']})"


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---- a. the machine and the packages ------------------------------------------------------------

def step_env(run: Run, deadline: float) -> dict:
    log, env = run.out / "env.log", run.child_env()
    commands, tools = [], {}
    if shutil.which("nvidia-smi"):
        commands.append(run_logged(["nvidia-smi"], log, deadline, env))
        query = ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"]
        commands.append(run_logged(query, log, deadline, env))
    for tool in TOOLS:
        tools[tool] = shutil.which(tool)
        if tools[tool]:
            commands.append(run_logged([tool, "--version"], log, deadline, env))
    probe = run_logged(python("versions-probe", run.out / "versions.json"), log, deadline, env)
    info = run_logged(python("qlora", "info"), log, deadline, env)
    commands += [probe, info]
    versions = _read_json(run.out / "versions.json")
    status = _status(probe) if probe["rc"] != 0 else _status(info)
    return dict(status=status, log=log.name, commands=commands, nvidia_smi=shutil.which("nvidia-smi"),
                tools=tools, versions=versions)


# ---- b. the CUDA extension and the CUDA tests ---------------------------------------------------

def step_extension(run: Run, deadline: float) -> dict:
    log = run.out / "extension.log"
    record = run_logged(python("extension-build", run.out / "extension.json"), log, deadline,
                        run.child_env())
    result = _read_json(run.out / "extension.json") or {}
    status = _status(record)
    if status == "ok" and not result["available"]:
        # Without a GPU the reason is expected (recorded); on the GPU it is a failure.
        status = f"skipped: {result['status']}" if run.dry_run else f"failed: {result['status']}"
    return dict(status=status, log=log.name, commands=[record], extension=result)


_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)
_UNFINISHED = re.compile(r"^(\S+::\S.*?) *\n\[gpu_check: killed", re.M)
_SKIP_REASON = re.compile(r"^SKIPPED \[(\d+)\] \S+?:\d+: (.*)$", re.M)
_RESULT_LINE = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|error|errors|deselected).*) =+$", re.M)
_FAILURE_SECTION = re.compile(r"^=+ (?:FAILURES|ERRORS) =+$(.*?)(?=^=+ short test summary info =+$|\Z)", re.M | re.S)
MAX_FAILURE_CHARS = 20_000


def parse_pytest_log(text: str) -> dict:
    """Counts per outcome from ``-v`` lines (also of a run killed midway, with the test it was
    running), the first failing test and its output, the skip reasons of ``-rs`` and the final
    result line."""
    counts, first_failure = {}, None
    for nodeid, outcome in _OUTCOME.findall(text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR") and first_failure is None:
            first_failure = nodeid
    skips = {}
    for number, reason in _SKIP_REASON.findall(text):
        skips[reason] = skips.get(reason, 0) + int(number)
    section = _FAILURE_SECTION.search(text)
    result = _RESULT_LINE.findall(text)
    unfinished = _UNFINISHED.search(text)
    return dict(counts=counts, unfinished=unfinished.group(1) if unfinished else None, first_failure=first_failure,
                failure_output=section.group(1).strip()[-MAX_FAILURE_CHARS:] if section else None,
                skip_reasons=skips, result_line=result[-1] if result else None)


def step_tests(run: Run, deadline: float) -> dict:
    log, selection, left_out = run.out / "tests.log", list(run.plan.tests), None
    extension = run.summary.get("steps", {}).get("extension", {}).get("status", "")
    if extension.startswith(("failed", "timed out", "error")):
        # Their fixture would build the extension again (a killed build also leaves torch's lock file,
        # on which the next build waits forever), and their failure would stop the kernels' tests.
        selection.remove(CSRC_TESTS)
        left_out = f"{CSRC_TESTS}: the extension step did not build it ({extension})"
    record = run_logged(python("pytest", *PYTEST_OPTIONS, *selection), log, deadline, run.child_env())
    parsed = parse_pytest_log(log.read_text(encoding="utf-8", errors="replace"))
    status = _status(record)
    if record["rc"] == 1:
        status = f"failed: {parsed['first_failure']}"
    return dict(status=status, log=log.name, commands=[record], left_out=left_out, **parsed)


# ---- c. the linear layer of every provider ------------------------------------------------------

_LEFT_OUT = re.compile(r"^- left out: ([\w-]+): (.*)$", re.M)


def kernel_rows(rows: list) -> list:
    """The summary's view of bench_kernels.json: one entry per measurement, with every column whose
    name has "predict" in it (the static speed model's time of the path a provider ran, issue 20)
    and the path itself where the rows carry them."""
    keep = ("n", "k", "modules", "m", "rank", "mode", "provider", "path", "timing", "ms_p50", "ms_p20", "ms_p80",
            "tflops", "gb_per_s", "pct_peak", "max_rel_err")
    return [dict({key: row.get(key) for key in keep}, **{k: v for k, v in row.items() if "predict" in k})
            for row in rows]


def step_kernels(run: Run, deadline: float) -> dict:
    log, out = run.out / "kernels.log", run.out / "kernels"
    record = run_logged(python("qlora", "bench", "kernels", *run.plan.kernels, "--out", out), log, deadline,
                        run.child_env())
    rows = kernel_rows(_read_json(out / "bench_kernels.json") or [])
    report = out / "bench_kernels.md"
    left_out = dict(_LEFT_OUT.findall(report.read_text(encoding="utf-8"))) if report.is_file() else {}
    predicted = sorted({key for row in rows for key, value in row.items()
                        if "predict" in key and value is not None})
    predictions = (f"beside each measured time: {', '.join(predicted)}" if predicted else
                   "none: this checkout's `qlora bench kernels` rows carry no predicted time")
    return dict(status=_status(record), log=log.name, commands=[record], predictions=predictions,
                left_out=left_out, rows=rows)


# ---- d. whole training steps --------------------------------------------------------------------

def step_train(run: Run, deadline: float) -> dict:
    log, out = run.out / "train.log", run.out / "train"
    record = run_logged(python("qlora", "bench", "train", *run.plan.train, "--out", out), log,
                        deadline, run.child_env())
    keep = ("stack", "components", "dtype", "step_ms_p50", "tokens_per_s", "peak_allocated_gib",
            "peak_reserved_gib", "speedup_vs_hf_stack", "memory_ratio_vs_hf_stack", "first_loss", "last_loss")
    rows = [{key: row.get(key) for key in keep} for row in _read_json(out / "bench_train.json") or []]
    return dict(status=_status(record), log=log.name, commands=[record], rows=rows)


# ---- e. issue 27's targets ----------------------------------------------------------------------

def targets(kernel_results: list, train_rows: list, on_gpu: bool) -> list:
    """Issue 27's targets from the measured rows: the fused forward at the largest M within 1.05x
    of dense bf16; at M = 1 >= 3.3x dense bf16 and >= 1.2x the HF stack (bitsandbytes' inference
    GEMV under PEFT's LoRA); training >= 2x the HF stack's tokens/s at <= 0.4x its peak memory.
    Judged (``met``) only ``on_gpu``: CPU times say nothing about the targets."""

    def _target(name: str, value, bound: float, at_least: bool, where: str) -> dict:
        met = None
        if value is None:
            note = "not measured (not timed, left out or failed)"
        elif not on_gpu:
            note = "dry run on CPU: not judged"
        else:
            met, note = (value >= bound if at_least else value <= bound), None
        return dict(target=name, where=where, value=value, bound=bound, met=met, note=note)

    ms = {(r["n"], r["k"], r["m"], r["mode"], r["provider"]): r["ms_p50"] for r in kernel_results}
    found = []
    fwd = [r for r in kernel_results if r["mode"] == "fwd"]
    for n, k, modules in dict.fromkeys((r["n"], r["k"], r["modules"]) for r in fwd):
        m_values = sorted({r["m"] for r in fwd if (r["n"], r["k"]) == (n, k)})

        def ratio(m, num, den):
            a, b = ms.get((n, k, m, "fwd", num)), ms.get((n, k, m, "fwd", den))
            return a / b if a and b else None

        where = f"{n}x{k} ({modules})"
        large, small = m_values[-1], m_values[0]
        found.append(_target(f"fused fwd time / dense bf16 at M = {large}", ratio(large, "qlora-fused", "dense-bf16"),
                             1.05, False, where))
        found.append(_target(f"fused fwd speed-up over dense bf16 at M = {small}",
                             ratio(small, "dense-bf16", "qlora-fused"), 3.3, True, where))
        found.append(_target(f"fused fwd speed-up over hf-stack (bitsandbytes GEMV + PEFT) at M = {small}",
                             ratio(small, "hf-stack", "qlora-fused"), 1.2, True, where))
    ours = next((r for r in train_rows if r["stack"] == "qlora"), None)
    if ours is not None:
        found.append(_target("training tokens/s over the HF stack", ours["speedup_vs_hf_stack"], 2.0, True, "train"))
        found.append(_target("training peak allocated memory / the HF stack's", ours["memory_ratio_vs_hf_stack"],
                             0.4, False, "train"))
    return found


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def step_lines(name: str, step: dict) -> list:
    """What a step found, in a few lines for stdout (the device tool returns its last 12,000
    characters); empty for a step that ended before it found anything."""
    lines = []
    if name == "env" and step.get("versions"):
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in step["versions"].items()))
        lines.append("tools: " + ", ".join(f"{k} {'found' if v else 'missing'}" for k, v in step["tools"].items()))
    if name == "tests" and "counts" in step:
        lines.append(f"tests: {step['result_line'] or step['counts']}; skip reasons: {step['skip_reasons']}")
        if step["left_out"]:
            lines.append(f"tests left out: {step['left_out']}")
        if step["unfinished"]:
            lines.append(f"running when the budget ended: {step['unfinished']}")
        if step["first_failure"]:
            lines.append(f"first failure: {step['first_failure']} (its output: summary.json, tests.log)")
    if name == "kernels" and "rows" in step:
        lines.append(f"predictions: {step['predictions']}; providers left out: {step['left_out'] or 'none'}")
        groups = {}
        for row in step["rows"]:
            groups.setdefault((row["mode"], row["n"], row["k"], row["m"]), []).append(row)
        for (mode, n, k, m), rows in groups.items():
            cells = []
            for row in rows:
                measured = f"{_fmt(row['ms_p50'])} ms" if row["ms_p50"] is not None else "not timed"
                predicted = [f"{key} {value:.4g}" for key, value in row.items()
                             if "predict" in key and isinstance(value, (int, float))]
                cells.append(f"{row['provider']} {measured}" + (f" ({', '.join(predicted)})" if predicted else ""))
            lines.append(f"  {mode} {n}x{k} M={m}: " + "; ".join(cells))
    if name == "train" and "rows" in step:
        for row in step["rows"]:
            lines.append(f"train {row['stack']}: {_fmt(row['tokens_per_s'])} tokens/s, peak allocated "
                         f"{_fmt(row['peak_allocated_gib'])} GiB, reserved {_fmt(row['peak_reserved_gib'])} GiB, "
                         f"loss {_fmt(row['first_loss'])} -> {_fmt(row['last_loss'])}")
    if "traceback" in step:
        lines.append(step["traceback"].rstrip())
    return lines


def summary_lines(summary: dict) -> list:
    """The closing lines: every step's status, then issue 27's targets."""
    lines = ["", f"== gpu_check summary ({summary['mode']}, finished {summary['finished']})"]
    lines += [f"{name:<10} {step['status']} ({step['seconds']:.0f} s)" for name, step in summary["steps"].items()]
    for t in summary["targets"]:
        verdict = {True: "met", False: "MISSED", None: t["note"]}[t["met"]]
        lines.append(f"target {t['target']} [{t['where']}]: {_fmt(t['value'])} (bound {t['bound']}) {verdict}")
    return lines


STEP_FUNCTIONS = dict(env=step_env, extension=step_extension, tests=step_tests, kernels=step_kernels,
                      train=step_train)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (empty, or new)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on CPU with tiny sizes, to check the script before the GPU call")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if (out / "summary.json").exists():
        parser.error(f"--out {out} already holds a gpu_check run (summary.json): choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out=out, plan=DRY if args.dry_run else FULL, dry_run=args.dry_run)
    command = shlex.join([sys.executable, __file__, *argv])
    (out / "command.txt").write_text(
        f"{command}\n\ndevice call (benchmarks/gpu_check.py, README):\n{RUN_COMMAND}\n\n"
        f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}\nQLORA_BACKEND={os.environ.get('QLORA_BACKEND', '')}\n",
        encoding="utf-8")
    run.summary = dict(mode="dry-run (CPU, tiny sizes)" if args.dry_run else "gpu", command=command,
                       started=_now(), finished=None, budgets_s=run.plan.budgets_s, steps={}, targets=[])
    run.save()
    run.log(f"gpu_check {run.summary['mode']} -> {out}")
    for name in STEPS:
        deadline = run.step_deadline(name)
        begin = time.monotonic()
        try:
            result = STEP_FUNCTIONS[name](run, deadline)
        except Exception as err:  # a broken step must not cost the steps after it
            result = dict(status=f"error in gpu_check: {type(err).__name__}: {err}", traceback=traceback.format_exc())
        result["seconds"] = round(time.monotonic() - begin, 1)
        run.summary["steps"][name] = result
        if name in ("kernels", "train"):
            run.summary["targets"] = targets(run.summary["steps"].get("kernels", {}).get("rows", []),
                                             run.summary["steps"].get("train", {}).get("rows", []),
                                             on_gpu=not args.dry_run)
        run.save()
        run.log(f"[{time.monotonic() - run.start:5.0f} s] {name}: {result['status']}")
        for line in step_lines(name, result):
            run.log(line)
        if name == "env" and not args.dry_run and not (result.get("versions") or {}).get("cuda_available"):
            run.summary["stopped"] = "no CUDA device visible to torch: this is the GPU run; use --dry-run on CPU"
            run.save()
            run.log(run.summary["stopped"])
            return 2
    run.summary["finished"] = _now()
    run.save()
    for line in summary_lines(run.summary):
        run.log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

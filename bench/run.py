"""RolePlayProj benchmark: one run, same model, data and settings for every comparison; prints a
table and writes bench/results.md (machine, versions, date and the exact command included).

Sections (--skip any of them):
- train: tokens/s (non-padding) of our train.py (launched like train.sh: deepspeed, ZeRO-2, QLoRA,
  length-grouped batches) against Hugging Face Trainer + PEFT QLoRA with the default collation
  (DataCollatorForSeq2Seq, random batches padded to their longest), same samples, batch, limits and
  LoRA settings; padding share of both; where each step's time goes (data, forward, backward,
  optimizer/engine).
- memory: resident weight bytes NF4 (double quant) vs bf16 vs fp32, whole model and decoder linear
  layers only; peak RSS of a few training steps in each mode (qlora, lora, full).
- generation: model.chat (KV cache) vs generate(use_cache=False) tokens/s, time to the first streamed
  token, utils.generate_batch tokens/s at batch 1 vs 8.
- data: data_helper.py wall time on a synthetic RoleBench-sized input (~9.1k lines).
- gpu: with CUDA, QLoRA MFU from the train section's tokens/s; otherwise "not measured on GPU yet".

Every measurement runs in a fresh subprocess, one at a time, with the same thread count and seed;
warm-up steps are excluded (training figures are total tokens / total time of the measured steps),
generation and data_helper figures are medians of repeats after a warm-up call. Benchmark on an
otherwise idle machine: a second CPU-heavy process cuts CPU figures 10x (the report shows how busy
the machine was during each measurement).

Examples:
    python bench/run.py                        # full run on output/tiny-baichuan2-chat (~5 min, 2 cores)
    python bench/run.py --quick --out /tmp/r.md  # smoke test on a random tiny model (~1 min)
    python bench/run.py --model /models/Baichuan2-7B-Chat --skip data   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("train", "memory", "generation", "data", "gpu")
MODES = ("qlora", "lora", "full")
DEFAULT_MODEL = "output/tiny-baichuan2-chat"  # utils.DEFAULT_BASE_DIR
DEFAULT_TRAIN = "data/train.json"  # utils.TRAIN_PATH
# train.sh's recipes: the tiny default's CPU-sized settings, and the real (7B) recipe
RECIPES = {
    "tiny": {"batch_size": 16, "grad_accum": 1, "lr": 2e-3, "weight_decay": 0.0, "warmup_ratio": 0.06,
             "lora_dropout": 0.05},
    "real": {"batch_size": 2, "grad_accum": 4, "lr": 1e-4, "weight_decay": 0.1, "warmup_ratio": 0.03,
             "lora_dropout": 0.1},
}
REAL_HIDDEN_SIZE = 1024  # models at least this wide get the real recipe, smaller ones the tiny one
# dense bf16 peak, TFLOP/s (vendor datasheets, no sparsity)
GPU_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 NVL": 835.0,
                   "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
BUSY_SHARE_WARN = 0.10  # other processes using more than this share of the CPU make figures unreliable


@dataclass
class Settings:
    model: str
    train_path: str
    recipe: str
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    lora_dropout: float
    steps: int
    warmup: int
    profile_steps: int
    max_len: int = 512
    max_src_len: int = 256
    lora_r: int = 16
    lora_alpha: int = 64
    seed: int = 1234
    gradient_checkpointing: bool = True
    launcher: str = "deepspeed"
    threads: int = 2
    new_tokens: int = 32
    repeats: int = 3
    data_lines: int = 9100
    data_repeats: int = 3
    modes: tuple[str, ...] = MODES
    peak_tflops: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Child:
    name: str
    rc: int
    wall_s: float
    cpu_s: float
    maxrss: int
    busy_other: float  # share of the machine's CPU used by other processes meanwhile
    log: Path


@dataclass
class Row:
    section: str
    metric: str
    value: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def own_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip()

    try:
        dirty = " (+ uncommitted changes)" if git("status", "--porcelain") else ""
        return (git("rev-parse", "--short", "HEAD") or "no commit") + dirty
    except (OSError, subprocess.SubprocessError):
        return "n/a"


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
class Bench:
    """Runs the sections; keeps the rows of the table, the children run and the notes."""

    def __init__(self, s: Settings, work: Path, skip: set[str]) -> None:
        self.s, self.work, self.skip = s, work, skip
        self.rows: list[Row] = []
        self.children: list[Child] = []
        self.details: list[str] = []
        self.failures: list[str] = []
        self.cache: dict[str, Any] = {}

    # --- subprocesses -----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        n = str(self.s.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0",
                   PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                 env.get("PYTHONPATH")])))
        return env

    def run_child(self, name: str, cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> Child:
        """Run `cmd` alone; wall time, its own CPU time and peak RSS (wait4), and how busy the rest
        of the machine was meanwhile. Output goes to <workdir>/<name>.log."""
        log = self.work / f"{name}.log"
        print(f"bench: {name} ...", flush=True)
        busy0, t0 = busy_cpu_seconds(), time.perf_counter()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            status, usage = wait_with_timeout(proc, timeout)
        wall = time.perf_counter() - t0
        cpu = usage.ru_utime + usage.ru_stime
        other = max(0.0, busy_cpu_seconds() - busy0 - cpu) / max(wall * (os.cpu_count() or 1), 1e-9)
        child = Child(name, os.waitstatus_to_exitcode(status), wall, cpu, usage.ru_maxrss * 1024, other, log)
        self.children.append(child)
        print(f"bench: {name}: {wall:.1f} s, rc {child.rc}", flush=True)
        if child.rc != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {child.rc}; log {log}:\n{tail}")
        return child

    def worker(self, task: str, name: str, *extra: str, mode: str = "qlora", steps: int = 0) -> tuple[dict, Child]:
        """bench/workers.py `task` in a fresh process with train.py's flags for these settings."""
        out = self.work / f"{name}.json"
        cmd = [sys.executable, str(REPO / "bench" / "workers.py"), task, "--json", str(out), *extra,
               *self.train_py_flags(mode, steps)]
        child = self.run_child(name, cmd)
        return json.loads(out.read_text(encoding="utf-8")), child

    def train_py_flags(self, mode: str, steps: int) -> list[str]:
        """train.py's flags for these settings, as train.sh passes them (plus --max_steps, no eval)."""
        s = self.s
        flags = ["--model_name_or_path", s.model, "--train_path", s.train_path, "--test_path", "",
                 "--train_mode", mode, "--per_device_train_batch_size", str(s.batch_size),
                 "--gradient_accumulation_steps", str(s.grad_accum), "--max_len", str(s.max_len),
                 "--max_src_len", str(s.max_src_len), "--learning_rate", str(s.lr),
                 "--weight_decay", str(s.weight_decay), "--num_train_epochs", "1", "--max_steps", str(steps),
                 "--warmup_ratio", str(s.warmup_ratio), "--lora_dim", str(s.lora_r), "--lora_alpha", str(s.lora_alpha),
                 "--lora_dropout", str(s.lora_dropout), "--ds_file", str(REPO / "ds_zero2_no_offload.json"),
                 "--seed", str(s.seed), "--save_model_step", "0", "--is_skip"]
        return flags + (["--gradient_checkpointing"] if s.gradient_checkpointing else [])

    def profile(self, mode: str) -> tuple[dict, Child]:
        """train.py's loop, timed per phase, in `mode` (cached: train and memory share the qlora run)."""
        key = f"ours_{mode}"
        if key not in self.cache:
            self.cache[key] = self.worker("ours", key, mode=mode, steps=self.s.warmup + self.s.profile_steps)
        return self.cache[key]

    # --- sections ---------------------------------------------------------------------------
    def run(self) -> None:
        for name in SECTIONS:
            if name in self.skip:
                continue
            try:
                getattr(self, f"section_{name}")()
            except Exception as e:  # noqa: BLE001  (one broken section must not hide the others' figures)
                msg = f"{name}: {type(e).__name__}: {e}"
                print(f"bench: section {msg}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                self.failures.append(msg)
                self.rows.append(Row(name, "FAILED", str(e).splitlines()[0][:200]))

    def section_train(self) -> None:
        entries, ours_child = self.run_train_py()
        alt, alt_child = self.worker("trainer", "hf_trainer", "--workdir", str(self.work / "hf_trainer"),
                                     steps=self.s.warmup + self.s.steps)
        prof, _ = self.profile("qlora")
        w = self.s.warmup
        ours = phase_summary(train_py_steps(entries, w))
        self.cache.update(train_py_rss=ours_child.maxrss, trainer_rss=alt_child.maxrss, ours_tok_s=ours["tok_s"])
        self.report_train(ours, alt, phase_summary(alt["steps"][w:]), prof, phase_summary(prof["steps"][w:]))

    def run_train_py(self) -> tuple[list[list[float]], Child]:
        """train.py as train.sh launches it (deepspeed launcher), with --max_steps; returns its logged
        per-step throughput entries."""
        s = self.s
        out = self.work / "train_py"
        cmd = [*self.launcher_cmd(), str(REPO / "train.py"), "--output_dir", str(out),
               *self.train_py_flags("qlora", s.warmup + s.steps)]
        self.cache["train_py_cmd"] = shlex.join(cmd)
        # cwd is a scratch folder: train.py writes images/loss.png relative to it
        child = self.run_child("train_py", cmd, cwd=self.work)
        return read_train_py_state(out), child

    def launcher_cmd(self) -> list[str]:
        exe = shutil.which("deepspeed")
        if self.s.launcher == "deepspeed" and exe:
            return [exe, "--num_gpus", "1", "--master_port", str(free_port())]
        if self.s.launcher == "deepspeed":
            self.s.notes.append("`deepspeed` launcher not on PATH: train.py ran as `python train.py`")
        return [sys.executable]

    def report_train(self, ours: dict, alt: dict, alt_sum: dict, prof: dict, prof_sum: dict) -> None:
        s = self.s
        epoch = alt["epoch_padding"]
        ratio = ours["tok_s"] / alt_sum["tok_s"]
        self.rows += [
            Row("train", f"QLoRA tokens/s (non-padding; total tokens / total time of {ours['n']} steps): ours "
                "train.py vs HF Trainer", f"{ours['tok_s']:.0f}", f"{alt_sum['tok_s']:.0f}", f"{ratio:.2f}x",
                ">= 1.3x", verdict(ratio >= 1.3)),
            Row("train", "padding share, whole epoch (ours: length-grouped, padded as train.py pads here: x8 on CUDA, "
                f"to the longest on CPU; Trainer: random batches, padded to the longest); ours padded to the "
                f"longest: {pct(epoch['ours_longest'])}",
                pct(epoch["ours"]), pct(epoch["random_longest"]), "", "ours < 5%", verdict(epoch["ours"] < 0.05)),
            Row("train", "padding share, measured steps", pct(ours["pad"]), pct(alt_sum["pad"]), "", "ours < 5%",
                verdict(ours["pad"] < 0.05)),
            Row("train", "padded positions/s (compute speed)", f"{ours['pos_s']:.0f}", f"{alt_sum['pos_s']:.0f}",
                f"{ours['pos_s'] / alt_sum['pos_s']:.2f}x"),
        ]
        self.details.append(train_details(ours, alt, alt_sum, prof, prof_sum, ratio))
        if {alt["threads"], prof["threads"]} != {s.threads}:
            s.notes.append(f"thread counts differ from --threads {s.threads}: Trainer {alt['threads']}, "
                           f"profiled loop {prof['threads']}")
        if alt["lengths"]["n"] < (s.warmup + s.steps) * s.batch_size * s.grad_accum:
            s.notes.append("the training set is smaller than the steps asked for: the runs wrapped around an epoch "
                           "(train.py then saves a checkpoint inside a timed step); use more data or fewer --steps")

    def section_memory(self) -> None:
        w, _ = self.worker("weights", "weights")
        self.cache["weights"] = w
        for part, label in (("whole", "whole model"), ("linear", "decoder linear layers only")):
            r = w["nf4"][part] / w["bf16"][part]
            self.rows.append(Row("memory", f"resident weights, {label}: NF4+double quant vs bf16 (fp32: "
                                 f"{mib(w['fp32'][part])})", mib(w["nf4"][part]), mib(w["bf16"][part]), pct(r),
                                 "<= 30%", verdict(r <= 0.30)))
        runtime = 0
        for mode in self.s.modes:
            prof, c = self.profile(mode)
            runtime = prof["rss_after_imports"]
            self.rows.append(Row("memory", f"peak RSS, {len(prof['steps'])} training steps, {mode} (train.py's loop; "
                                 "reference: the same process after its imports, before loading the model)",
                                 mib(c.maxrss), mib(runtime)))
            steps = prof["steps"][self.s.warmup:]
            if steps:
                summary = phase_summary(steps)
                self.rows.append(Row("train", f"{mode}: non-padding tokens/s and padding share over {len(steps)} "
                                     "steps (train.py's loop, after warm-up)", f"{summary['tok_s']:.0f}",
                                     pct(summary["pad"])))
        for key, label in (("train_py_rss", "train.py under the launcher (incl. checkpoint save)"),
                           ("trainer_rss", "HF Trainer alternative")):
            if key in self.cache:
                self.rows.append(Row("memory", f"peak RSS, qlora, {label}", mib(self.cache[key]),
                                     mib(runtime) if runtime else ""))
        self.details.append(memory_details(w))

    def section_generation(self) -> None:
        g, _ = self.worker("generation", "generation", "--new_tokens", str(self.s.new_tokens),
                           "--repeats", str(self.s.repeats))
        n = g["new_tokens"]
        chat, nocache = n / g["chat_s"], n / g["no_cache_s"]
        b1, b8 = g["batch1_tokens"] / g["batch1_s"], g["batch8_tokens"] / g["batch8_s"]
        where = f"{g['dtype']} on {g['device']}, prompt {g['prompt_tokens']} tokens, {n} new tokens, greedy"
        self.rows += [
            Row("generation", f"decode tokens/s: model.chat (KV cache) vs generate(use_cache=False) ({where})",
                f"{chat:.1f}", f"{nocache:.1f}", f"{chat / nocache:.2f}x", ">= 1x", verdict(chat >= nocache)),
            Row("generation", "time to first streamed token: model.chat(stream=True) vs utils.chat_stream",
                f"{1000 * g['ttft_model_chat_s']:.0f} ms", f"{1000 * g['ttft_chat_stream_s']:.0f} ms"),
            Row("generation", f"utils.generate_batch tokens/s on the same {len(g['batch_prompt_tokens'])} prompts "
                f"({min(g['batch_prompt_tokens'])}-{max(g['batch_prompt_tokens'])} tokens): batch 8 vs batch 1",
                f"{b8:.1f}", f"{b1:.1f}", f"{b8 / b1:.2f}x"),
        ]

    def section_data(self) -> None:
        from bench.synth import synth_rolebench

        folder = self.work / "rolebench"
        profiles = synth_rolebench(folder, self.s.data_lines, seed=self.s.seed)
        lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in folder.glob("*.jsonl"))
        cmd = [sys.executable, str(REPO / "data_helper.py"), "--data_dir", str(folder), "--profiles", str(profiles),
               "--attributes", "", "--output_dir", str(folder / "out")]
        times = [self.run_child(f"data_helper_{i}", cmd, cwd=self.work).wall_s for i in range(self.s.data_repeats)]
        self.rows.append(Row("data", f"data_helper.py on {lines} synthetic RoleBench-zh lines, wall seconds "
                             f"(median of {len(times)}, process start included)", f"{median_of(times):.2f} s"))

    def section_gpu(self) -> None:
        w = self.cache.get("weights") or self.worker("weights", "weights")[0]
        name, params = w["cuda_device"], w["params"]
        if not name:
            self.rows.append(Row("gpu", "QLoRA tokens/s and MFU on GPU", "not measured on GPU yet"))
            return
        peak = self.s.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
        tok_s = self.cache.get("ours_tok_s")
        if tok_s is None:
            self.rows.append(Row("gpu", f"MFU on {name}", "needs the train section (not run)"))
            return
        achieved = 6 * params * tok_s
        mfu = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "n/a (pass --peak_tflops)"
        self.rows.append(Row("gpu", f"QLoRA on {name}: 6 x {params / 1e9:.2f} B params x tokens/s vs bf16 peak "
                             f"{peak:g} TFLOP/s", f"{tok_s:.0f} tok/s, {achieved / 1e12:.1f} TFLOP/s", "", mfu))
        self.s.notes.append("MFU uses the standard 6·N·tokens/s with N = all base parameters. QLoRA's real work "
                            "differs: the frozen base skips weight gradients (about 4·N), gradient checkpointing "
                            "re-runs the forward (+2·N), and NF4 dequantization (memory-bound) and the LoRA "
                            "matmuls (~2·r/d of each layer) are not counted.")


# ---------------------------------------------------------------------------------------------
# Reading and summarising results
# ---------------------------------------------------------------------------------------------
def wait_with_timeout(proc: subprocess.Popen, timeout: float) -> tuple[int, Any]:
    """os.wait4 the child (its own rusage: peak RSS and CPU time); kill its process group on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this child leads (start_new_session)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, usage


def read_train_py_state(output_dir: Path) -> list[list[float]]:
    """train.py's `throughput` entries [step, tokens/s, padding share] (newest checkpoint's trainer_state.json)."""
    import train

    ckpts = train.list_checkpoints(str(output_dir))
    if not ckpts:
        raise RuntimeError(f"train.py wrote no complete checkpoint in {output_dir}")
    state = json.loads((ckpts[-1][1] / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("throughput", [])


def train_py_steps(entries: list[list[float]], warmup: int) -> list[dict]:
    """train.py's post-warm-up steps as {tokens, positions, seconds}, from the counts it logs per step
    ([step, tokens/s, padding share, tokens, padded positions, seconds])."""
    steps = [{"tokens": e[3], "positions": e[4], "seconds": e[5]} for e in entries if e[0] > warmup]
    if not steps:
        raise RuntimeError(f"train.py logged no step after {warmup} warm-up steps")
    return steps


PHASES = ("data", "forward", "backward", "optimizer")


def phase_summary(steps: list[dict]) -> dict:
    """Totals over the steps: tokens/s and padded positions/s (total / total time), padding share,
    mean seconds per step and per phase (where recorded)."""
    seconds = sum(st["seconds"] for st in steps)
    tokens, positions = sum(st["tokens"] for st in steps), sum(st["positions"] for st in steps)
    out = {"tok_s": tokens / seconds, "pos_s": positions / seconds, "pad": 1 - tokens / positions,
           "step_s": seconds / len(steps), "n": len(steps)}
    if all(ph in steps[0] for ph in PHASES):
        for ph in PHASES:
            out[ph] = sum(st[ph] for st in steps) / len(steps)
        out["other"] = out["step_s"] - sum(out[ph] for ph in PHASES)
    return out


def train_details(ours: dict, alt: dict, alt_sum: dict, prof: dict, prof_sum: dict, ratio: float) -> str:
    """The 'where the time goes' table and the decomposition of the speed ratio."""
    lines = ["### Training: where the time goes (mean per optimizer step, warm-up excluded)", "",
             ("| run | data | forward | backward | optimizer / engine step | other | step | padded positions/s "
              "| tokens/s | padding |"), "|---|---|---|---|---|---|---|---|---|---|"]
    runs = ((f"ours: train.py's loop, profiled ({prof['optimizer']}, {prof['precision']})", prof_sum),
            (f"HF Trainer ({alt['optimizer']}, {alt['precision']})", alt_sum))
    for label, x in runs:
        cells = " | ".join(f"{1000 * x[p]:.0f} ms ({pct(x[p] / x['step_s'])})" for p in (*PHASES, "other"))
        lines.append(f"| {label} | {cells} | {1000 * x['step_s']:.0f} ms | {x['pos_s']:.0f} | {x['tok_s']:.0f} "
                     f"| {pct(x['pad'])} |")
    lines.append(f"| ours: train.py itself (its log) | | | | | | {1000 * ours['step_s']:.0f} ms | {ours['pos_s']:.0f} "
                 f"| {ours['tok_s']:.0f} | {pct(ours['pad'])} |")
    epoch = alt["epoch_padding"]
    pad_factor = (1 - epoch["ours"]) / (1 - epoch["random_longest"])
    compute_factor = ours["pos_s"] / alt_sum["pos_s"]
    lines += ["", f"Speed ratio ours/Trainer = **{ratio:.2f}x** = useful share of computed positions x positions/s:",
              (f"- padding: (1 - {pct(ours['pad'])}) / (1 - {pct(alt_sum['pad'])}) = "
               f"**{(1 - ours['pad']) / (1 - alt_sum['pad']):.2f}x** on the measured steps "
               f"({pad_factor:.2f}x over a whole epoch: {pct(epoch['ours'])} vs {pct(epoch['random_longest'])});"),
              (f"- padded positions per second: **{compute_factor:.2f}x** (engine, precision, optimizer; shorter "
               "batches also cost less attention per position);"),
              (f"- train.py's loop re-run with timers (the profiled row, its first {prof_sum['n']} measured steps) "
               f"reached {prof_sum['tok_s']:.0f} tok/s vs train.py's own {ours['tok_s']:.0f}: they differ by "
               "run-to-run noise, by batch lengths, and by what the profile leaves out (tqdm/TensorBoard logging, "
               "the per-step all-reduce of the statistics)."),
              ("- data = fetching and collating a batch (ours: DataLoader over the length-grouped sampler and "
               "utils.DataCollator; Trainer: DataCollatorForSeq2Seq); optimizer = engine.step() (ours: DeepSpeed "
               "ZeRO-2 bf16 optimizer with fp32 master weights, gradient clipping, LR schedule) or the optimizer "
               "step (Trainer); other = the rest of the step (Trainer: clipping, zero_grad, callbacks).")]
    return "\n".join(lines)


def memory_details(w: dict) -> str:
    rows = [f"| {k} | {mib(w[k]['whole'])} | {mib(w[k]['linear'])} | {w[k]['load_seconds']:.2f} s |"
            for k in ("nf4", "bf16", "fp32")]
    return "\n".join(["### Memory: resident weight bytes", "",
                      (f"{w['params']:,} parameters, {w['linear_params']:,} of them in the decoder's linear layers "
                      f"({pct(w['linear_params'] / w['params'])}); only those are quantized (embeddings, norms and "
                      "the NormHead stay in bf16), so on a tiny model the whole-model ratio is dominated by the "
                      "unquantized embeddings and head; the linear-only ratio is what a 7B model approaches."), "",
                      "| load | whole model | decoder linears | load time |", "|---|---|---|---|", *rows])


# ---------------------------------------------------------------------------------------------
# Settings, inputs, report
# ---------------------------------------------------------------------------------------------
def resolve_model(args: argparse.Namespace, work: Path, notes: list[str]) -> tuple[str, str]:
    """(model folder, recipe name). --quick without --model, or a missing default, uses a random tiny
    Baichuan2 built in the scratch folder (development only: says so in the report)."""
    if args.model:
        config = Path(args.model) / "config.json"
        if not config.is_file():
            raise SystemExit(f"error: --model {args.model}: no config.json there")
        hidden = json.loads(config.read_text(encoding="utf-8")).get("hidden_size", 0)
        return str(Path(args.model).resolve()), "real" if hidden >= REAL_HIDDEN_SIZE else "tiny"
    if not args.quick and (REPO / DEFAULT_MODEL / "config.json").is_file():
        return str(REPO / DEFAULT_MODEL), "tiny"
    if not args.quick:
        msg = (f"{DEFAULT_MODEL} not built (python -m baichuan.build_default): using a RANDOM tiny Baichuan2 of "
               "the same shape (development only)")
        print(f"bench: warning: {msg}", file=sys.stderr, flush=True)
        notes.append(msg)
    return make_random_model(work, default_shape=not args.quick), "tiny"


def make_random_model(work: Path, default_shape: bool) -> str:
    """bench.synth.random_tiny_model in a child process: torch is never imported here, so this
    process stays small (a child's peak RSS from wait4 includes this process's RSS at fork time)."""
    folder = work / "tiny-model"
    code = ("import sys; from pathlib import Path; from bench.synth import random_tiny_model; "
            "random_tiny_model(Path(sys.argv[1]), default_shape=sys.argv[2] == '1')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, str(folder), "1" if default_shape else "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: building a random tiny model failed:\n{proc.stderr[-2000:]}")
    return str(folder)


def resolve_train_path(args: argparse.Namespace, work: Path, samples: int, notes: list[str]) -> str:
    """--train_path, else data/train.json, else synthetic records (development only)."""
    from bench.synth import synth_train_records, write_jsonl

    if args.train_path:
        if not Path(args.train_path).is_file():
            raise SystemExit(f"error: --train_path {args.train_path}: not found")
        return str(Path(args.train_path).resolve())
    if not args.quick and (REPO / DEFAULT_TRAIN).is_file():
        return str(REPO / DEFAULT_TRAIN)
    n = int(samples * 1.4) + 32  # ~10% are dropped as too long (--is_skip)
    if not args.quick:
        msg = f"{DEFAULT_TRAIN} not built (python data_helper.py): using {n} SYNTHETIC records (development only)"
        print(f"bench: warning: {msg}", file=sys.stderr, flush=True)
        notes.append(msg)
    records = synth_train_records(n, seed=args.seed, scale=0.3 if args.quick else 1.0)
    return str(write_jsonl(work / "train.json", records))


def build_settings(args: argparse.Namespace, work: Path) -> Settings:
    notes: list[str] = []
    model, recipe = resolve_model(args, work, notes)
    r = dict(RECIPES[recipe])
    if args.quick:
        r.update(batch_size=4, grad_accum=1)
    r.update({k: v for k, v in (("batch_size", args.batch_size), ("grad_accum", args.grad_accum)) if v})
    steps, warmup, profile = (2, 1, 2) if args.quick else (args.steps, args.warmup, args.profile_steps)
    train_path = resolve_train_path(args, work, (warmup + steps) * r["batch_size"] * r["grad_accum"], notes)
    modes = tuple(m for m in (args.modes or "").split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"error: --modes: unknown {bad}; choose from {','.join(MODES)}")
    s = Settings(model=model, train_path=train_path, recipe=recipe, steps=steps, warmup=warmup, profile_steps=profile,
                 seed=args.seed, launcher=args.launcher or "deepspeed", threads=args.threads,
                 modes=modes or (MODES if recipe == "tiny" else ("qlora", "lora")),
                 gradient_checkpointing=not args.no_gradient_checkpointing, peak_tflops=args.peak_tflops,
                 notes=notes, **r)
    if args.quick:
        s.new_tokens, s.repeats, s.data_lines, s.data_repeats = 4, 1, 600, 1
        s.launcher = args.launcher or "python"
        s.modes = modes if args.modes else ("qlora",)
    return s


def machine_info(s: Settings) -> list[str]:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    versions = []
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate", "trl"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return [(f"- machine: {cpu}; {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; {platform.platform()}"),
            f"- threads per measurement: {s.threads} (OMP_NUM_THREADS/MKL_NUM_THREADS)",
            f"- python {platform.python_version()}; " + ", ".join(versions),
            f"- repository: {git_revision()}"]


def settings_lines(s: Settings) -> list[str]:
    return [f"- model: `{s.model}` (recipe: train.sh's {s.recipe} settings)",
            (f"- data: `{s.train_path}`; max_len {s.max_len}, max_src_len {s.max_src_len}, over-long samples "
            "dropped (--is_skip), the same tokenized samples (utils.Baichuan2PromptDataSet) for every run"),
            (f"- batch {s.batch_size} x grad accum {s.grad_accum}; lr {s.lr}, weight decay {s.weight_decay}, warm-up "
            f"ratio {s.warmup_ratio}; LoRA r {s.lora_r}, alpha {s.lora_alpha}, dropout {s.lora_dropout}, all linear "
            f"layers; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; seed {s.seed}"),
            (f"- training runs: {s.warmup} warm-up + {s.steps} measured optimizer steps (profiled loop and "
            f"per-mode memory runs: {s.warmup} + {s.profile_steps}); generation: {s.new_tokens} tokens, median of "
            f"{s.repeats} after a warm-up call; data_helper: median of {s.data_repeats}")]


def children_table(children: list[Child]) -> list[str]:
    lines = ["| process | wall | own CPU | peak RSS | other processes' CPU meanwhile | exit |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.wall_s:.1f} s | {c.cpu_s:.1f} s | {mib(c.maxrss)} | {pct(c.busy_other)} | {c.rc} |"
              for c in children]
    return lines


def render(b: Bench, command: str, started: datetime.datetime, load: tuple[float, float]) -> str:
    s = b.s
    busy = [c for c in b.children if c.busy_other > BUSY_SHARE_WARN]
    head = ["# RolePlayProj benchmark results", "",
            f"- date: {started.isoformat(timespec='seconds')} (UTC), took {time.time() - started.timestamp():.0f} s",
            f"- command: `{command}`", *machine_info(s),
            f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}", "", "## Settings", "",
            *settings_lines(s), ""]
    if busy:
        head += [(f"> **Warning:** other processes used more than {pct(BUSY_SHARE_WARN)} of the CPU during "
                 f"{', '.join(c.name for c in busy)}; those figures are not reliable (benchmark alone)."), ""]
    table = ["## Results", "", "| section | metric | ours / measured | reference | ratio | goal | met |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r.section} | {r.metric} | {r.value} | {r.reference} | {r.ratio} | {r.goal} | {r.met} |"
              for r in b.rows]
    notes = [f"- {n}" for n in s.notes]
    tail = [line for d in b.details for line in ("", d)] + ["", "## Processes", "", *children_table(b.children),
                                                             "", (f"Peak RSS is the process's maximum resident set "
                                                             f"(wait4); it cannot read below this bench process's "
                                                             f"own {mib(own_rss())} (inherited at fork).")]
    if "train_py_cmd" in b.cache:
        tail += ["", f"train.py command: `{b.cache['train_py_cmd']}`"]
    return "\n".join(head + table + ([""] + ["## Notes", ""] + notes if notes else []) + tail) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help=f"model folder (default {DEFAULT_MODEL}; a random tiny Baichuan2 "
                   "with a warning when it is not built, and always with --quick)")
    p.add_argument("--train_path", default="", help=f"training records (default {DEFAULT_TRAIN}; synthetic "
                   "records with a warning when it is not built, and always with --quick)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per training run (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up optimizer steps, excluded from every figure")
    p.add_argument("--profile_steps", type=int, default=5,
                   help="measured steps of the per-phase profile and of each per-mode memory run")
    p.add_argument("--batch_size", type=int, default=0, help="micro-batch size (default: train.sh's recipe)")
    p.add_argument("--grad_accum", type=int, default=0, help="gradient accumulation (default: train.sh's recipe)")
    p.add_argument("--modes", default="", help=f"train modes of the peak-RSS runs, comma list (default "
                   f"{','.join(MODES)}; qlora,lora for a 7B-sized model, whose full fine-tuning needs more than one "
                   "80 GB GPU; --quick: qlora)")
    p.add_argument("--no_gradient_checkpointing", action="store_true",
                   help="train without gradient checkpointing (train.sh uses it; so does the bench by default)")
    p.add_argument("--launcher", choices=["deepspeed", "python"], default="",
                   help="how train.py is started: the deepspeed launcher like train.sh (default), or plain "
                        "python (default with --quick: saves two interpreter starts)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads per measurement")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="GPU bf16 dense peak for MFU (default: by name)")
    p.add_argument("--seed", type=int, default=1234, help="seed for data, init and batch order (every run)")
    p.add_argument("--quick", action="store_true", help="tiny everything (smoke test, about a minute)")
    p.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results.md"), help="where the markdown report goes")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, checkpoints)")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - set(SECTIONS)
    if unknown:
        p.error(f"--skip: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="rpp-bench-"))
    try:
        bench = Bench(build_settings(args, work), work, set(filter(None, args.skip.split(","))))
        bench.run()
        report = render(bench, shlex.join(["python", "bench/run.py", *argv]), started, (load0, os.getloadavg()[0]))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        print(report)
        print(f"bench: wrote {out}" + (f"; scratch kept in {work}" if args.keep else ""), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if bench.failures:
        print("bench: failed sections: " + "; ".join(bench.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

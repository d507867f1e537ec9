"""RolePlayProj benchmark: real train.py runs with train.sh's recipe against the usual alternative;
prints a table and writes bench/results.md (machine, versions, date and the exact commands included).

Sections (--skip any of them):
- train: non-padding tokens/s and computed positions/s of train.py, launched as train.sh launches it
  (packed: train.sh's PACKING=1), against its peers configured as their users would, on the same model,
  samples, batch, limits and LoRA settings (bench/workers.py): HF Trainer + PEFT with
  train_sampling_strategy="group_by_length" (with the model's SDPA attention, and with
  attn_implementation="eager"), TRL SFTTrainer with padding_free=True (or why it does not
  run), and the default random-batch Trainer kept as a labelled reference; in both shapes of the job:
  the recipe (tiny: LoRA + embeddings/head in full) and LoRA only (the 7B recipe's shape). Padding
  shares; where each step's time goes (train.py --profile's profile.json: data, forward, backward,
  optimizer/engine step); this CPU's measured dense matmul peak at the training dtype and train.py's
  model-FLOP utilisation against it (6·N·tokens/s, and the ~4·N of LoRA/QLoRA beside it).
- memory: resident weight bytes NF4 (double quant) vs bf16 vs fp32; peak RSS and tokens/s of a short
  train.py run per recipe variant (qlora, lora, full, QLoRA without the modules trained in full).
- generation: model.chat (KV cache) vs generate(use_cache=False) tokens/s, time to the first streamed
  token, generation.generate_batch tokens/s at batch 1 vs 8.
- data: data_helper.py wall time on a synthetic RoleBench-zh folder of the published size (bench/synth.py).
- gpu: with CUDA, QLoRA MFU from the train section's tokens/s; otherwise "not measured on GPU yet". The
  Baichuan2-7B shape on one GPU is bench/gpu.py's (`--dry_run` prints its plan anywhere).

Every training command is `bash train.sh --print`'s for an environment that picks the recipe (tiny:
MODEL without config.json and TINY_MODEL=<model>; real: MODEL=<model>; variants: train.sh variables
such as TRAIN_MODE=lora), with only `bench_flags` on top. Each measurement runs alone in a fresh process;
warm-up steps are excluded; generation and data_helper figures are medians after a warm-up call. The
train section runs train.py and each configured peer `--train_repeats` times (default 2) interleaved and
compares the fastest run of each: on this shared 2-core machine the same run's speed moved by up to 10%
between runs, more than the differences being measured. Run it on an idle machine: a second CPU-heavy
process cuts CPU figures 10x (the report says how busy it was).

How long: the embedded default on 2 idle CPU cores about 10 minutes (6 train.py runs and 8 peer runs of
23 steps each, generation, data; the very first DeepSpeed run on a machine also builds its CPU ops,
about 2 minutes more); --quick 2-3 minutes; a 7B model on one GPU 15-30 minutes.

Examples:
    python bench/run.py                                       # full run on output/tiny-baichuan2-chat
    python bench/run.py --quick --threads 1 --out /tmp/r.md   # smoke test on a random tiny model
    python bench/run.py --set GRADIENT_CHECKPOINTING=1        # a train.sh variable for every run
    python bench/run.py --model /models/Baichuan2-7B-Chat --skip data   # real weights: the real recipe
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.harness import child_env, free_port  # noqa: E402  (after the path setup: runnable as a script)
from tools.recipe import arg_value, train_command  # noqa: E402

SECTIONS = ("train", "memory", "generation", "data", "gpu")
# recipe variants: the train.sh variables that make them, and their label
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "qlora": ({}, "QLoRA (the recipe)"),
    "lora": ({"TRAIN_MODE": "lora"}, "LoRA on a bf16/fp32 base (TRAIN_MODE=lora)"),
    "full": ({"TRAIN_MODE": "full"}, "full fine-tuning (TRAIN_MODE=full)"),
    "lora-only": ({"MODULES_TO_SAVE": ""}, "QLoRA, LoRA weights only (MODULES_TO_SAVE='')"),
}
DEFAULT_MODEL = "output/tiny-baichuan2-chat"  # train.sh's TINY_MODEL
DEFAULT_TRAIN = "data/train.json"  # train.sh's TRAIN_PATH
REAL_HIDDEN_SIZE = 1024  # a --model at least this wide gets train.sh's real recipe, a smaller one the tiny one
# dense bf16 peak, TFLOP/s (vendor datasheets, no sparsity)
GPU_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 NVL": 835.0,
                   "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
BUSY_SHARE_WARN = 0.10  # other processes using more than this share of the CPU make figures unreliable
PHASES = ("data", "forward", "backward", "optimizer", "other")
# the peers, as their users configure them (bench/workers.py tasks); the random-batch Trainer is the reference
PEERS: dict[str, list[str]] = {"trainer-random": ["trainer", "--sampling", "random"],
                               "trainer-grouped": ["trainer", "--sampling", "group_by_length"],
                               "trainer-grouped-eager": ["trainer", "--sampling", "group_by_length", "--attn", "eager"],
                               "trl": ["trl"]}
PEER_LABELS = {"trainer-random": "HF Trainer, random batches (reference: the default, not how a speed-minded user "
                                 "configures it)",
               "trainer-grouped": "HF Trainer, train_sampling_strategy=group_by_length",
               "trainer-grouped-eager": "HF Trainer, train_sampling_strategy=group_by_length, "
                                        "attn_implementation=eager",
               "trl": "TRL SFTTrainer, padding_free=True"}


@dataclass
class Settings:
    model: str
    train_path: str
    recipe: str  # "tiny" or "real": which of train.sh's recipes
    work: Path
    steps: int
    warmup: int
    variants: tuple[str, ...]
    recipe_vars: dict[str, str] = field(default_factory=dict)  # --set: train.sh variables for every run
    launcher: str = "deepspeed"
    threads: int = 2
    new_tokens: int = 32
    repeats: int = 3
    data_repeats: int = 3
    train_repeats: int = 2
    seed: int = 1234
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


@dataclass
class Row:
    section: str
    metric: str
    value: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --- The training command: train.sh's, plus the bench's own flags ---
def bench_flags(output_dir: Path, steps: int) -> dict[str, str | bool]:
    """The only flags the bench sets over train.sh's printed command (a value replaces the recipe's or
    is appended; True adds a switch, False removes it). Everything else is train.sh's recipe."""
    return {"--output_dir": str(output_dir),  # a scratch folder, never the recipe's output
            "--test_path": "",  # no eval pass: only training steps are measured
            "--max_steps": str(steps),  # a short run
            "--profile": True,  # per-phase timers, written to output_dir/profile.json
            "--overwrite_output_dir": True,  # the tiny recipe sets it, the real one does not
            "--plot_to_images": False}  # leave the repository's images/loss.png alone


def with_flags(args: list[str], flags: Mapping[str, str | bool]) -> list[str]:
    out = list(args)
    for flag, value in flags.items():
        if isinstance(value, bool):
            out = [a for a in out if a != flag] + ([flag] if value else [])
        elif flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def deepspeed_launcher() -> str | None:
    """The deepspeed launcher of this interpreter's environment (also when the venv is not activated)."""
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.is_file() else shutil.which("deepspeed")


def train_py_command(env: Mapping[str, str], output_dir: Path, steps: int, launcher: str = "deepspeed") -> list[str]:
    """train.sh's train-stage command for `env` with `bench_flags`; run from the repo root, as train.sh
    runs it. launcher "python" (or no deepspeed launcher installed): `python train.py` with the same args."""
    printed = train_command(env)
    at = printed.index("train.py")
    args = with_flags(printed[at + 1:], bench_flags(output_dir, steps))
    exe = deepspeed_launcher() if launcher == "deepspeed" else None
    return [exe, *printed[1:at], "train.py", *args] if exe else [sys.executable, "train.py", *args]


def recipe_env(s: Settings, variant: str = "qlora") -> dict[str, str]:
    """The train.sh variables that select the recipe (train.sh trains TINY_MODEL with its tiny settings
    when $MODEL has no config.json), the data, --set's variables and the variant's."""
    pick = ({"MODEL": str(s.work / "no-real-weights"), "TINY_MODEL": s.model} if s.recipe == "tiny"
            else {"MODEL": s.model})
    return {**pick, "TRAIN_PATH": s.train_path, **s.recipe_vars, **VARIANTS[variant][0]}


# --- The benchmark ---
class Bench:
    """Runs the sections; keeps the table's rows, the children run and the notes."""

    def __init__(self, s: Settings, skip: set[str]) -> None:
        self.s, self.skip = s, skip
        self.rows: list[Row] = []
        self.children: list[Child] = []
        self.details: list[str] = []
        self.failures: list[str] = []
        self.runs: dict[str, tuple[dict, Child, list[str]]] = {}  # train.py runs by variant
        self.weights: dict | None = None
        self.trainer_rss = 0

    def run_child(self, name: str, cmd: list[str], env: dict[str, str], timeout: float = 3600) -> Child:
        """Run `cmd` alone from the repo root; wall time, its CPU time and peak RSS (wait4: the child and
        its descendants, e.g. train.py under the launcher), and how busy the rest of the machine was."""
        log = self.s.work / f"{name}.log"
        print(f"bench: {name} ...", flush=True)
        busy0, t0 = busy_cpu_seconds(), time.perf_counter()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            status, usage = wait_with_timeout(proc, timeout)
        wall = time.perf_counter() - t0
        cpu = usage.ru_utime + usage.ru_stime
        other = max(0.0, busy_cpu_seconds() - busy0 - cpu) / max(wall * (os.cpu_count() or 1), 1e-9)
        child = Child(name, os.waitstatus_to_exitcode(status), wall, cpu, usage.ru_maxrss * 1024, other)
        self.children.append(child)
        print(f"bench: {name}: {wall:.1f} s, rc {child.rc}", flush=True)
        if child.rc != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {child.rc}; log {log}:\n{tail}")
        return child

    def train_py(self, variant: str, repeat: int = 0) -> tuple[dict, Child, list[str]]:
        """A real train.py run of `variant` (warm-up + measured steps): its profile.json, process, command.
        `repeat` > 0: another run of the same (compare_peers keeps the fastest as `variant`'s run)."""
        key = variant if repeat == 0 else f"{variant} #{repeat + 1}"
        if key not in self.runs:
            name = f"train_py_{variant}" + (f"_{repeat + 1}" if repeat else "")
            out = self.s.work / name
            env = child_env(free_port(), self.s.threads, PYTHONHASHSEED="0", **recipe_env(self.s, variant))
            cmd = train_py_command(env, out, self.s.warmup + self.s.steps, self.s.launcher)
            child = self.run_child(name, cmd, env)
            profile = json.loads((out / "profile.json").read_text(encoding="utf-8"))
            config = next(out.glob("epoch-*/run_config.json"), None)  # precision and optimizer, for the report
            profile["run_config"] = json.loads(config.read_text(encoding="utf-8")) if config else {}
            self.runs[key] = (profile, child, cmd)
        return self.runs[key]

    def worker(self, task: str, *extra: str, variant: str = "qlora", name: str = "") -> tuple[dict, Child]:
        """bench/workers.py `task` in a fresh process, given the `variant` run's train.py arguments."""
        name = name or task
        out = self.s.work / f"{name}.json"
        env = child_env(None, self.s.threads, PYTHONHASHSEED="0")
        train_cmd = train_py_command(env | recipe_env(self.s, variant), self.s.work / f"train_py_{variant}",
                                     self.s.warmup + self.s.steps, "python")
        cmd = [sys.executable, str(REPO / "bench" / "workers.py"), task, "--json", str(out), *extra, "--",
               *train_cmd[2:]]
        child = self.run_child(name, cmd, env)
        return json.loads(out.read_text(encoding="utf-8")), child

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
        """train.py against its peers as their users configure them, in both shapes of the job: the recipe
        (tiny: LoRA + embeddings/head in full) and LoRA only (the 7B recipe's shape); then MFU on this CPU."""
        shapes = ["qlora"] + (["lora-only"] if "lora-only" in self.s.variants else [])
        for shape in shapes:
            self.compare_peers(shape)
        self.section_mfu()

    def compare_peers(self, shape: str) -> None:
        """train.py and each peer `train_repeats` times, interleaved (ours, peers, ours, peers, ...), and the
        fastest run of each compared: on a shared machine one run's speed moves by up to ~10%, and the
        least-disturbed run of each is the fair pair. The reference-only random-batch Trainer runs once."""
        label = "recipe" if shape == "qlora" else "LoRA only"
        jobs = [(key, args) for key, args in PEERS.items() if shape == "qlora" or key != "trainer-random"]
        ours_runs: list[tuple[dict, Child, list[str]]] = []
        peer_runs: dict[str, list[tuple[dict, dict, Child]]] = {key: [] for key, _ in jobs}
        for r in range(self.s.train_repeats):
            ours_runs.append(self.train_py(shape, r))
            for key, args in jobs:
                if key not in peer_runs or (r and key == "trainer-random"):
                    continue
                name = f"{key}_{shape}" + (f"_{r + 1}" if r else "")
                alt, child = self.worker(*args, "--workdir", str(self.s.work / name), variant=shape, name=name)
                if "unsupported" in alt:
                    self.rows.append(Row("train", f"{label}: {PEER_LABELS[key]}", "does not run", alt["unsupported"]))
                    del peer_runs[key]
                    continue
                peer_runs[key].append((alt, summary(alt["steps"], self.s.warmup), child))
        summaries = [summary(run[0]["steps"], self.s.warmup) for run in ours_runs]
        tok_s = [x["tok_s"] for x in summaries]
        fastest = tok_s.index(max(tok_s))
        self.runs[shape] = ours_runs[fastest]  # the other sections read the fastest run
        prof, ours = self.runs[shape][0], summaries[fastest]
        peers: dict[str, tuple[dict, dict]] = {}
        for key, runs in peer_runs.items():
            alt, peer, child = max(runs, key=lambda run: run[1]["tok_s"])
            peers[key] = (alt, peer)
            if key == "trainer-random" and shape == "qlora":
                self.trainer_rss = child.maxrss
        if self.s.train_repeats > 1:
            each = "; ".join(f"{PEER_LABELS[k].split(' (')[0]} " + " / ".join(f"{x[1]['tok_s']:.0f}" for x in runs)
                             for k, runs in peer_runs.items() if k != "trainer-random")
            self.rows.append(Row("train", f"{label}: non-padding tokens/s of each run, interleaved (the fastest of "
                                 "each is compared below)", "train.py " + " / ".join(f"{t:.0f}" for t in tok_s), each))
        configured = {k: v for k, v in peers.items() if k != "trainer-random"}
        best = max(configured, key=lambda k: configured[k][1]["tok_s"]) if configured else None
        for key, (alt, peer) in peers.items():
            ratio, per_pos = ours["tok_s"] / peer["tok_s"], ours["pos_s"] / peer["pos_s"]
            is_best = key == best
            self.rows += [
                Row("train", f"{label}: non-padding tokens/s, train.py vs {PEER_LABELS[key]}"
                    + (" (best-configured peer)" if is_best else "") + f" ({ours['n']} steps)",
                    f"{ours['tok_s']:.0f}", f"{peer['tok_s']:.0f}", f"{ratio:.2f}x", ">= 1.3x" if is_best else "",
                    verdict(ratio >= 1.3) if is_best else ""),
                Row("train", f"{label}: computed positions/s (padding included), train.py vs {PEER_LABELS[key]}",
                    f"{ours['pos_s']:.0f}", f"{peer['pos_s']:.0f}", f"{per_pos:.2f}x", ">= 1.0x" if is_best else "",
                    verdict(per_pos >= 1.0) if is_best else ""),
                Row("train", f"{label}: padding share of computed positions, measured steps: train.py vs "
                    f"{PEER_LABELS[key]}", pct(ours["pad"]), pct(peer["pad"]), "", "ours < 1%" if is_best else "",
                    verdict(ours["pad"] < 0.01) if is_best else ""),
            ]
            self.details.append(train_details(prof, ours, alt, peer, ratio, f"{label}, vs {PEER_LABELS[key]}"))
        if shape == "qlora" and peers:
            alt = next(iter(peers.values()))[0]
            epoch = alt["epoch_padding"]
            self.rows.append(Row("train", "padding share of a whole epoch without packing: length-grouped batches "
                                 "(train.py's sampler) vs random batches (the Trainer's default)", pct(epoch["ours"]),
                                 pct(epoch["random_longest"])))
            if alt["samples"] < (self.s.warmup + self.s.steps) * alt["samples_per_step"]:
                self.s.notes.append("the training set is smaller than the steps asked for: the runs wrapped "
                                    "around an epoch (train.py then saves a checkpoint inside a timed step); "
                                    "use fewer --steps")

    def section_mfu(self) -> None:
        """This CPU's dense matmul peak at the training dtype, and train.py's model-FLOP utilisation."""
        m, _ = self.worker("matmul")
        prof = self.runs["qlora"][0]
        tok_s = summary(prof["steps"], self.s.warmup)["tok_s"]
        n = m["params"] - m["input_embedding"]
        peak = m["gflops"] * 1e9
        self.rows += [
            Row("train", f"dense matmul peak of this CPU, {m['dtype']} (the training dtype), {m['threads']} threads, "
                f"{m['size']}x{m['size']} torch.mm, best of {m['repeats']}", f"{m['gflops']:.1f} GFLOP/s"),
            Row("train", f"train.py model-FLOP utilisation, recipe: 6·N·tokens/s over that peak (N = {n:,} parameters "
                "that multiply: all but the input embedding table)", pct(6 * n * tok_s / peak),
                f"4·N (LoRA/QLoRA: no weight gradients of the frozen base): {pct(4 * n * tok_s / peak)}"),
        ]

    def section_memory(self) -> None:
        w, _ = self.worker("weights")
        self.weights = w
        for part, label in (("whole", "whole model"), ("linear", "decoder linear layers only")):
            r = w["nf4"][part] / w["bf16"][part]
            self.rows.append(Row("memory", f"resident weights, {label}: NF4+double quant vs bf16 (fp32: "
                                 f"{mib(w['fp32'][part])})", mib(w["nf4"][part]), mib(w["bf16"][part]), pct(r),
                                 "<= 30%", verdict(r <= 0.30)))
        n = self.s.warmup + self.s.steps
        for variant in self.s.variants:
            prof, child, _ = self.train_py(variant)
            label = VARIANTS[variant][1]
            x = summary(prof["steps"], self.s.warmup)
            self.rows += [Row("memory", f"peak RSS of a whole train.py run of {n} steps, {label}", mib(child.maxrss)),
                          Row("train", f"{label}: train.py non-padding tokens/s and padding share, {x['n']} "
                              "measured steps", f"{x['tok_s']:.0f}", pct(x["pad"]))]
        if self.trainer_rss and "qlora" in self.runs:
            ours = self.runs["qlora"][1].maxrss
            self.rows.append(Row("memory", "peak RSS, QLoRA training process: train.py vs HF Trainer", mib(ours),
                                 mib(self.trainer_rss), pct(ours / self.trainer_rss)))
        self.s.notes.append(f"{w['params']:,} parameters, {pct(w['linear_params'] / w['params'])} of them in the "
                            "decoder's linear layers, the only ones quantized: on a tiny model the whole-model ratio "
                            "is dominated by the bf16 embeddings and head; a 7B model approaches the linear-only one.")

    def section_generation(self) -> None:
        g, _ = self.worker("generation", "--new_tokens", str(self.s.new_tokens), "--repeats", str(self.s.repeats))
        n = g["new_tokens"]
        chat, nocache = n / g["chat_s"], n / g["no_cache_s"]
        b1, b8 = g["batch1_tokens"] / g["batch1_s"], g["batch8_tokens"] / g["batch8_s"]
        where = f"{g['dtype']} on {g['device']}, prompt {g['prompt_tokens']} tokens, {n} new tokens, greedy"
        lengths = g["batch_prompt_tokens"]
        self.rows += [
            Row("generation", f"decode tokens/s: model.chat (KV cache) vs generate(use_cache=False) ({where})",
                f"{chat:.1f}", f"{nocache:.1f}", f"{chat / nocache:.2f}x", ">= 1x", verdict(chat >= nocache)),
            Row("generation", "time to first streamed token: model.chat(stream=True) vs generation.chat_stream",
                f"{1000 * g['ttft_model_chat_s']:.0f} ms", f"{1000 * g['ttft_chat_stream_s']:.0f} ms"),
            Row("generation", f"generation.generate_batch tokens/s on the same {len(lengths)} prompts "
                f"({min(lengths)}-{max(lengths)} tokens): batch 8 vs batch 1", f"{b8:.1f}", f"{b1:.1f}",
                f"{b8 / b1:.2f}x"),
        ]

    def section_data(self) -> None:
        from bench.synth import synth_rolebench

        folder = self.s.work / "rolebench"
        profiles = synth_rolebench(folder, seed=self.s.seed)  # the published size
        lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in folder.glob("*.jsonl"))
        cmd = [sys.executable, "data_helper.py", "--data_dir", str(folder), "--profiles", str(profiles),
               "--attributes", "", "--output_dir", str(folder / "out")]
        env = child_env(None, self.s.threads)
        times = [self.run_child(f"data_helper_{i}", cmd, env).wall_s for i in range(self.s.data_repeats)]
        self.rows.append(Row("data", f"data_helper.py on {lines} synthetic RoleBench-zh lines (the published size), "
                             f"wall seconds (median of {len(times)}, process start included)",
                             f"{statistics.median(times):.2f} s"))

    def section_gpu(self) -> None:
        w = self.weights or self.worker("weights")[0]
        name, params = w["cuda_device"], w["params"]
        if not name:
            self.rows.append(Row("gpu", "QLoRA tokens/s and MFU on GPU (the 7B shape: python bench/gpu.py; its plan: "
                                 "--dry_run)", "not measured on GPU yet"))
            return
        if "qlora" not in self.runs:
            self.rows.append(Row("gpu", f"MFU on {name}", "needs the train section (not run)"))
            return
        tok_s = summary(self.runs["qlora"][0]["steps"], self.s.warmup)["tok_s"]
        peak = self.s.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
        achieved = 6 * params * tok_s
        mfu = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "n/a (pass --peak_tflops)"
        self.rows.append(Row("gpu", f"QLoRA on {name}: 6 x {params / 1e9:.2f} B params x tokens/s vs bf16 peak "
                             f"{peak:g} TFLOP/s", f"{tok_s:.0f} tok/s, {achieved / 1e12:.1f} TFLOP/s", "", mfu))
        self.s.notes.append("MFU counts the standard 6·N·tokens/s (N = all base parameters), not QLoRA's real work "
                            "(no weight gradients for the frozen base, recomputation, NF4 dequantization); on CUDA "
                            "--profile waits for the GPU at each phase, which costs a little speed.")


# --- Processes and figures ---
def busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_with_timeout(proc: subprocess.Popen, timeout: float) -> tuple[int, Any]:
    """os.wait4 the child: its own rusage (peak RSS, CPU time), which getrusage(RUSAGE_CHILDREN) cannot give
    per child; on timeout kill the process group it leads (start_new_session)."""
    killer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, usage


def summary(steps: list[dict], warmup: int) -> dict:
    """Over the steps after the warm-up: tokens/s and padded positions/s (total / total time), padding
    share, mean seconds per step and per phase ("other" is what the four phases leave of the step)."""
    steps = [st for st in steps if st["step"] > warmup]
    if not steps:
        raise RuntimeError(f"no training step recorded after {warmup} warm-up steps")
    seconds = sum(st["seconds"] for st in steps)
    tokens, positions = sum(st["tokens"] for st in steps), sum(st["positions"] for st in steps)
    out = {"tok_s": tokens / seconds, "pos_s": positions / seconds, "pad": 1 - tokens / positions,
           "step_s": seconds / len(steps), "n": len(steps)}
    out |= {ph: sum(st[ph] for st in steps) / len(steps) for ph in PHASES[:-1]}
    return out | {"other": out["step_s"] - sum(out[ph] for ph in PHASES[:-1])}


# --- Report ---
def train_details(prof: dict, ours: dict, alt: dict, peer: dict, ratio: float, title: str = "") -> str:
    """The 'where the time goes' table and the decomposition of the speed ratio."""
    cfg = prof["run_config"]
    ds = cfg.get("deepspeed_config", {})
    stage = ds.get("zero_optimization", {}).get("stage", "?")
    # train.py's single_rank_zero: a ZeRO-2 config runs as stage 0 on one fp32 rank (its run_config says so)
    stage = f"{stage} (the config's ZeRO-2 on one fp32 rank)" if cfg.get("deepspeed_config_note") else stage
    engine = f"DeepSpeed ZeRO-{stage} {ds.get('optimizer', {}).get('type', '?')}, {cfg.get('precision', '?')}"
    lines = [f"### Training{': ' + title if title else ''}: where the time goes (mean per optimizer step, warm-up "
             "excluded)", "",
             "| run | data | forward | backward | optimizer / engine step | other | step | padded positions/s "
             "| tokens/s | padding |", "|---|---|---|---|---|---|---|---|---|---|"]
    packed = ", packed" if cfg.get("packing") else ""
    for label, x in ((f"train.py --profile ({engine}{packed})", ours),
                     (f"{alt.get('label', 'HF Trainer')} ({alt['optimizer']}, {alt['precision']})", peer)):
        cells = " | ".join(f"{1000 * x[p]:.0f} ms ({pct(x[p] / x['step_s'])})" for p in PHASES)
        lines.append(f"| {label} | {cells} | {1000 * x['step_s']:.0f} ms | {x['pos_s']:.0f} | {x['tok_s']:.0f} "
                     f"| {pct(x['pad'])} |")
    lines += ["", f"Speed ratio {ratio:.2f}x = padding, (1 - {pct(ours['pad'])}) / (1 - {pct(peer['pad'])}), x "
              "padded positions/s. data = fetching and collating a batch and copying it to the device; optimizer "
              "= engine.step() (DeepSpeed: clipping, optimizer, LR schedule) or the Trainer's optimizer step; other "
              "= the rest of the step (logging, the all-reduce of the step's statistics; Trainer: callbacks)."]
    return "\n".join(lines)


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip()

    try:
        dirty = " (+ uncommitted changes)" if git("status", "--porcelain") else ""
        return (git("rev-parse", "--short", "HEAD") or "no commit") + dirty
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def machine_info(s: Settings) -> list[str]:
    import psutil

    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")), "?") if cpuinfo.is_file() else platform.processor()
    versions = []
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return [f"- machine: {cpu}; {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; {platform.platform()}",
            f"- threads per measurement: {s.threads} (OMP_NUM_THREADS/MKL_NUM_THREADS)",
            f"- python {platform.python_version()}; " + ", ".join(versions), f"- repository: {git_revision()}"]


def settings_lines(s: Settings) -> list[str]:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in recipe_env(s).items())
    return [f"- model: `{s.model}`; train.sh's {s.recipe} recipe, `{env} bash train.sh --print`, plus the bench's "
            f"{' '.join(bench_flags(s.work, 0))} (the train.py commands are at the end)",
            f"- data: `{s.train_path}` (the same tokenized samples for every run)",
            f"- training runs: {s.warmup} warm-up + {s.steps} measured optimizer steps each ({s.launcher} launcher), "
            f"train.py and each configured peer {s.train_repeats}x interleaved, the fastest run of each compared; "
            f"generation: {s.new_tokens} tokens, median of {s.repeats} after a warm-up call; data_helper: median of "
            f"{s.data_repeats}"]


def render(b: Bench, command: str, started: datetime.datetime, load: tuple[float, float]) -> str:
    s = b.s
    busy = [c.name for c in b.children if c.busy_other > BUSY_SHARE_WARN]
    lines = ["# RolePlayProj benchmark results", "",
             f"- date: {started.isoformat(timespec='seconds')} (UTC), took {time.time() - started.timestamp():.0f} s",
             f"- command: `{command}`", *machine_info(s),
             f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}", "", "## Settings", "",
             *settings_lines(s), ""]
    if busy:
        lines += [f"> **Warning:** other processes used more than {pct(BUSY_SHARE_WARN)} of the CPU during "
                  f"{', '.join(busy)}; those figures are not reliable (benchmark alone).", ""]
    lines += ["## Results", "", "| section | metric | ours / measured | reference | ratio | goal | met |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.metric} | {r.value} | {r.reference} | {r.ratio} | {r.goal} | {r.met} |"
              for r in sorted(b.rows, key=lambda r: SECTIONS.index(r.section))]  # stable: each section's order
    if s.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in s.notes]]
    for d in b.details:
        lines += ["", d]
    lines += ["", "## Processes", "", "| process | wall | own CPU | peak RSS | other processes' CPU meanwhile | exit |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.wall_s:.1f} s | {c.cpu_s:.1f} s | {mib(c.maxrss)} | {pct(c.busy_other)} | {c.rc} |"
              for c in b.children]
    lines += ["", "Peak RSS is the process tree's largest resident set (wait4); train.py's includes its final "
              "checkpoint save."]
    lines += [f"\ntrain.py command ({name}): `{shlex.join(cmd)}`" for name, (_, _, cmd) in b.runs.items()]
    return "\n".join(lines) + "\n"


# --- Settings and command line ---
def warn(notes: list[str], msg: str) -> None:
    print(f"bench: warning: {msg}", file=sys.stderr, flush=True)
    notes.append(msg)


def resolve_model(args: argparse.Namespace, work: Path, notes: list[str]) -> tuple[str, str]:
    """(model folder, recipe). --quick without --model, or a missing default, uses a random tiny Baichuan2
    (development only: the report says so), built in a child process so that this process never imports
    torch and stays small (a child's peak RSS from wait4 starts from this process's RSS at fork)."""
    if args.model:
        config = Path(args.model) / "config.json"
        if not config.is_file():
            raise SystemExit(f"error: --model {args.model}: no config.json there")
        hidden = json.loads(config.read_text(encoding="utf-8")).get("hidden_size", 0)
        return str(Path(args.model).resolve()), "real" if hidden >= REAL_HIDDEN_SIZE else "tiny"
    if not args.quick and (REPO / DEFAULT_MODEL / "config.json").is_file():
        return str(REPO / DEFAULT_MODEL), "tiny"
    if not args.quick:
        warn(notes, f"{DEFAULT_MODEL} not built (python tools/build_default.py): using a RANDOM tiny Baichuan2 of "
             "the same shape (development only)")
    code = ("import sys; from pathlib import Path; from bench.synth import random_tiny_model; "
            "random_tiny_model(Path(sys.argv[1]), default_shape=sys.argv[2] == '1')")
    folder = work / "tiny-model"
    proc = subprocess.run([sys.executable, "-c", code, str(folder), "0" if args.quick else "1"], cwd=REPO,
                          env=child_env(None), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: building a random tiny model failed:\n{proc.stderr[-2000:]}")
    return str(folder), "tiny"


def resolve_train_path(args: argparse.Namespace, work: Path, notes: list[str]) -> str:
    """--train_path, else data/train.json, else synthetic records (development only)."""
    if args.train_path:
        if not Path(args.train_path).is_file():
            raise SystemExit(f"error: --train_path {args.train_path}: not found")
        return str(Path(args.train_path).resolve())
    if not args.quick and (REPO / DEFAULT_TRAIN).is_file():
        return str(REPO / DEFAULT_TRAIN)
    from bench.synth import synth_train_records, write_jsonl

    n = 400  # the default 23 steps at the tiny recipe's batch 16, and room for the samples --is_skip drops
    if not args.quick:
        warn(notes, f"{DEFAULT_TRAIN} not built (python data_helper.py): {n} SYNTHETIC records (development only)")
    return str(write_jsonl(work / "train.json", synth_train_records(n, args.seed, 0.3 if args.quick else 1.0)))


def build_settings(args: argparse.Namespace, work: Path) -> Settings:
    notes: list[str] = []
    model, recipe = resolve_model(args, work, notes)
    recipe_vars = dict(kv.split("=", 1) for kv in args.set)
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants:
        variants = ("qlora",) if args.quick else tuple(VARIANTS) if recipe == "tiny" else ("qlora", "lora")
    s = Settings(model=model, train_path=resolve_train_path(args, work, notes), recipe=recipe, work=work,
                 steps=args.steps, warmup=args.warmup, variants=variants, recipe_vars=recipe_vars,
                 launcher=args.launcher or ("python" if args.quick else "deepspeed"), threads=args.threads,
                 seed=args.seed, peak_tflops=args.peak_tflops, notes=notes, train_repeats=args.train_repeats)
    if args.quick:
        s.steps, s.warmup, s.new_tokens, s.repeats, s.data_repeats, s.train_repeats = 2, 1, 4, 1, 1, 1
        notes.append("--quick: a random tiny model, synthetic data, 2 measured steps: a smoke test, not figures")
    if "lora-only" in s.variants and arg_value(train_command(recipe_env(s)), "--modules_to_save") == "":
        s.variants = tuple(v for v in s.variants if v != "lora-only")  # the same run as qlora
    if s.launcher == "deepspeed" and not deepspeed_launcher():
        notes.append("the `deepspeed` launcher is not installed: train.py ran as `python train.py` with the same args")
    return s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help=f"model folder (default {DEFAULT_MODEL}; a random tiny Baichuan2 "
                   "with a warning when it is not built, and always with --quick)")
    p.add_argument("--train_path", default="", help=f"training records (default {DEFAULT_TRAIN}; synthetic "
                   "records with a warning when it is not built, and always with --quick)")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                   help="a train.sh variable for every training run, e.g. --set GRADIENT_CHECKPOINTING=1 (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per training run (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up optimizer steps, excluded from every figure")
    p.add_argument("--train_repeats", type=int, default=2,
                   help="runs of train.py and of each peer per job shape, interleaved; the fastest of each is compared")
    p.add_argument("--variants", default="", help=f"recipe variants of the per-variant runs, comma list of "
                   f"{','.join(VARIANTS)} (default: all for the tiny recipe, qlora,lora for the real one, whose "
                   "full fine-tuning needs more than one 80 GB GPU; --quick: qlora)")
    p.add_argument("--launcher", choices=["deepspeed", "python"], default="",
                   help="how train.py is started: train.sh's deepspeed launcher (default), or `python train.py` "
                        "with the same args (default with --quick: saves two interpreter starts)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads per measurement")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="GPU bf16 dense peak for MFU (default: by name)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the synthetic data (training uses train.sh's)")
    p.add_argument("--quick", action="store_true", help="tiny everything (smoke test, 1-2 minutes)")
    p.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results.md"), help="where the markdown report goes")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, checkpoints, profiles)")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - set(SECTIONS)
    if unknown:
        p.error(f"--skip: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if set(filter(None, args.variants.split(","))) - set(VARIANTS):
        p.error(f"--variants: choose from {','.join(VARIANTS)}")
    if any("=" not in kv for kv in args.set):
        p.error("--set takes VAR=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="rpp-bench-"))
    try:
        bench = Bench(build_settings(args, work), set(filter(None, args.skip.split(","))))
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

"""Helpers shared by the benchmarks (run as scripts, so this folder is on sys.path).

- :func:`best_of` / :func:`parse_bench_args`: timing and options of the sampling benchmarks.
- :func:`compare_trainers`: seconds per optimizer step and peak memory of trainer configurations, each
  in its own spawned child process (so one configuration's memory never counts towards another's, on
  the CPU too), stepped in turns so that machine load hits all of them alike.
"""
from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call; the minimum is the least noisy estimate.
    CUDA work is waited for, so GPU timings are real."""
    import torch

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def user_cpu_time() -> float:
    """This process's CPU time in user mode: unlike wall time, not stretched by other jobs on a shared
    machine, and unlike system time, not inflated by page reclaim under their memory pressure."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def work_clock(device: str) -> Callable[[], float]:
    """The clock a benchmark on ``device`` times with: this process's CPU time on the CPU (other jobs on a
    shared machine do not stretch it), wall time on a GPU."""
    return time.process_time if device == "cpu" else time.perf_counter


def best_of_interleaved(functions: dict[str, Callable], repeats: int, clock: Callable[[], float] = time.perf_counter
                        ) -> dict[str, float]:
    """:func:`best_of` of several functions called in turns (one warm-up call each), so that load from other
    jobs on a shared machine hits them alike. ``clock``: wall time by default; ``time.process_time`` (this
    process's CPU time) measures the work itself on a shared CPU, best with one thread (OMP_NUM_THREADS=1:
    idle threads spin)."""
    import torch

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize()
            start = clock()
            fn()
            synchronize()
            times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def parse_bench_args(description: str, add_options=None):
    """The common --repeats/--skip-sampling options, plus what ``add_options(parser)`` adds; prints the device
    line every report starts with."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sampling", action="store_true")
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    return args, device


def load_tiny_sd15():
    """Boot the real ComfyUI in this process and load the test harness's tiny SD1.5: (model, clip, vae)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.checkpoints import load_sd15
    from harness.comfy_env import boot_comfy

    boot_comfy()
    return load_sd15()


def parse_trainer_args():
    """The trainer benchmarks' options: --resolution (px of the tiny SD1.5 training images) and --steps."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args()


def describe_trainer_run(args, accumulation: int) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"device {device}, threads {torch.get_num_threads()}, tiny SD1.5, {args.resolution}px, "
            f"micro-batch 2 x accumulation {accumulation}, {args.steps} steps each (median)")


def optimizer_steps(step_fn, optimizer, accumulation: int) -> Callable[[int], None]:
    """``step(index)``: one optimizer step of a pack trainer in training mode, ``accumulation`` micro-batches
    of ``step_fn(MicroStep)``, each with the generator the training loop would give it (seed 1)."""
    from harness.comfy_env import pack_module

    loop, glue = pack_module("training.loop"), pack_module("nodes.training_glue")

    def step(index: int) -> None:
        with glue.training_mode():
            for micro in range(accumulation):
                loss = step_fn(loop.MicroStep(index, micro, loop.micro_step_generator(1, index, micro)))
                (loss / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


@dataclass(frozen=True)
class PeakMemory:
    """A child's training peak: resident set (CPU RAM) above its RSS right after the model load, and
    ``torch.cuda.max_memory_allocated`` since then (None without CUDA)."""

    rss_mib: float
    cuda_mib: Optional[float]


@dataclass(frozen=True)
class TrainerResult:
    seconds_per_step: float  # median over the measured steps
    peak: PeakMemory


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak_tracking() -> int:
    """Reset the peak counters to now and return the current RSS in KiB.

    The RSS peak is the kernel's high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs,
    so the load's own transient peak (state dict + model) never counts as training memory; getrusage's
    ru_maxrss cannot be reset (and for a spawned child also carries the forked parent's). Linux only.
    """
    import torch

    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return _proc_status_kib("VmRSS")


def peak_since(baseline_kib: int) -> PeakMemory:
    import torch

    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return PeakMemory((_proc_status_kib("VmHWM") - baseline_kib) / 1024, cuda)


def _serve(connection, load: Callable, build: Callable, options: dict) -> None:
    """Child process: load the model, build the configuration, then run one optimizer step per request."""
    import torch

    loaded = load()
    baseline = start_peak_tracking()
    step = build(loaded, options)  # -> callable(index) running one optimizer step
    connection.send("ready")
    while (index := connection.recv()) is not None:
        start = time.perf_counter()
        step(index)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        connection.send(time.perf_counter() - start)
    connection.send(peak_since(baseline))


def compare_trainers(build: Callable, configurations: dict[str, dict], steps: int,
                     load: Callable = load_tiny_sd15) -> dict[str, TrainerResult]:
    """Run ``build(loaded, options) -> step(index)`` of every configuration in its own spawned process.

    ``build`` and ``load`` must be module-level functions (spawn pickles them by name); ``loaded`` is
    what the child's ``load()`` returned (by default the tiny SD1.5's (model, clip, vae)). The children start one after another (each waits
    until the previous one is built); then every round steps each child once, in turns, after one
    warm-up round that is not timed. Returns per configuration the median seconds per step and the
    child's peak memory.
    """
    context = multiprocessing.get_context("spawn")
    children = {}
    try:
        for name, options in configurations.items():
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_serve, args=(child_end, load, build, options), name=f"bench {name}")
            process.start()
            child_end.close()  # this process's copy: without it a child that dies leaves recv() waiting forever
            children[name] = (process, parent_end)
            if parent_end.recv() != "ready":
                raise RuntimeError(f"{name}: the child process did not start")
        times = {name: [] for name in children}
        for index in range(steps + 1):  # round 0 warms up
            for name, (_, connection) in children.items():
                connection.send(index)
                seconds = connection.recv()
                if index:
                    times[name].append(seconds)
        results = {}
        for name, (process, connection) in children.items():
            connection.send(None)
            results[name] = TrainerResult(statistics.median(times[name]), connection.recv())
        return results
    finally:
        for process, _ in children.values():  # finished children exit at once; a failed run's are stopped
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def describe_seconds(results: dict[str, TrainerResult], ratio: tuple[str, str] | None = None, note: str = "") -> str:
    """Seconds per optimizer step of every configuration, and ``ratio`` (numerator, denominator) of two."""
    line = "seconds per optimizer step: " + ", ".join(f"{name} {r.seconds_per_step:.3f}" for name, r in results.items())
    if ratio is not None:
        top, bottom = ratio
        line += f"; {top} / {bottom} {results[top].seconds_per_step / results[bottom].seconds_per_step:.3f}{note}"
    return line


def describe_peaks(results: dict[str, TrainerResult]) -> str:
    """One line per memory kind: peak RSS above the loaded model (and CUDA peak when present), in MiB."""
    lines = ["peak RSS above the loaded model, MiB: " + ", ".join(
        f"{name} {r.peak.rss_mib:.0f}" for name, r in results.items())]
    if all(r.peak.cuda_mib is not None for r in results.values()):
        lines.append("peak CUDA memory allocated, MiB: " + ", ".join(
            f"{name} {r.peak.cuda_mib:.0f}" for name, r in results.items()))
    return "\n".join(lines)

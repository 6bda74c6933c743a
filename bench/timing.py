"""Timing helper shared by the benchmarks (run as scripts, so this folder is on sys.path)."""
import time


def best_of(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call; the minimum is the least noisy estimate."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parse_bench_args(description: str):
    """The common --repeats/--skip-sampling options; prints the device line every report starts with."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    return args, device

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

"""The trainer benchmarks' process harness (bench/timing.py): results come back, failures surface."""
import sys
import threading
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import timing  # noqa: E402 (bench/ is not a package)


def load_nothing():
    return "loaded"


def build_counter(loaded, options):
    """A 'trainer' whose step allocates ``options['mib']`` MiB and keeps it (so the peak grows)."""
    kept = []

    def step(index):
        assert loaded == "loaded"
        kept.append(bytearray(options["mib"] * 2**20))
    return step


def build_failing(loaded, options):
    raise RuntimeError("broken configuration")


def _run(*args, **kwargs):
    """compare_trainers in a thread, so that a hang fails the test instead of stalling the run."""
    outcome = {}

    def target():
        try:
            outcome["result"] = timing.compare_trainers(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (handed to the test)
            outcome["error"] = error
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "compare_trainers hung"
    return outcome


def test_each_configuration_reports_its_own_time_and_peak_memory():
    outcome = _run(build_counter, {"small": {"mib": 1}, "large": {"mib": 40}}, steps=2, load=load_nothing)
    results = outcome["result"]
    assert set(results) == {"small", "large"}
    assert all(r.seconds_per_step >= 0 for r in results.values())
    assert results["large"].peak.rss_mib >= 100  # 3 steps (warm-up + 2) of 40 MiB, kept
    assert results["small"].peak.rss_mib < 50


def test_a_child_that_fails_is_an_error_not_a_hang():
    outcome = _run(build_failing, {"broken": {}}, steps=1, load=load_nothing)
    assert isinstance(outcome.get("error"), EOFError)


def test_seconds_line_names_every_configuration_and_the_ratio_asked_for():
    peak = timing.PeakMemory(rss_mib=1.0, cuda_mib=None)
    results = {"ours": timing.TrainerResult(1.5, peak), "reference": timing.TrainerResult(1.2, peak)}
    line = timing.describe_seconds(results, ("ours", "reference"), " (target <= 1.0)")
    assert line == "seconds per optimizer step: ours 1.500, reference 1.200; ours / reference 1.250 (target <= 1.0)"
    assert timing.describe_seconds(results) == "seconds per optimizer step: ours 1.500, reference 1.200"

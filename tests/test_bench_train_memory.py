"""bench/train_memory.py: the DiT extrapolation and the printed table (unit); a configuration's measurement on the
tiny models, in this process; nightly, one tiny run of the whole bench in a subprocess, whose table must be complete
(its numbers are never asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import train_memory  # noqa: E402 (bench/ is not a package)
from harness.nightly import only_nightly  # noqa: E402


def measurement(peak, seconds):
    return train_memory.Measurement(peak, seconds, seconds / 2, peak / 2, 1000, "cpu")


def test_dit_depths_are_extrapolated_linearly_to_the_full_depth():
    results = {train_memory.Configuration("RealCustom", "flux", 1024, True, depth, "full"): measurement(peak, seconds)
               for depth, peak, seconds in ((1, 5.0, 10.0), (2, 7.0, 13.0), (4, 11.0, 19.0))}
    results[train_memory.Configuration("DETEX", "sd15", 512, None, None, "full")] = measurement(6.0, 30.0)
    dit, unet = train_memory.rows(results)
    # per unit: 2 GiB and 3 s; 19 units: 5 + 18 * 2, 10 + 18 * 3
    assert dit.configuration.depth == 19 and abs(dit.peak_gib - 41.0) < 1e-9 and abs(dit.seconds - 64.0) < 1e-9
    assert "per unit 2.000 GiB, 3.00 s" in dit.note and "largest residual 0.000 GiB" in dit.note
    assert unet.peak_gib == 6.0 and unet.note == "measured"
    table = train_memory.describe([dit, unet], "cpu").splitlines()
    assert "| RealCustom | Flux.1 dev | 1024 | on | 41.00 | n/a | no | no |" in table[3]
    assert "| DETEX | SD1.5 | 512 | n/a | 6.00 | n/a | yes | yes |" in table[4]


@pytest.mark.parametrize("trainer, family, checkpointing, depth", [("RealCustom", "flux", True, 1),
                                                                  ("PVATrainer", "sd35", False, 2),
                                                                  ("DisenDiff", "sd15", None, None),
                                                                  ("DETEX", "sd15", None, None)])
def test_a_configuration_builds_its_model_and_steps_its_trainer(comfy, trainer, family, checkpointing, depth):
    if family != "flux":
        only_nightly("the default run measures one DiT configuration: its depth-unit builder and checkpointing")
    configuration = train_memory.Configuration(trainer, family, 32, checkpointing, depth, "tiny")
    measured = train_memory.measure(configuration, steps=1)
    assert measured.peak_gib > 0 and measured.seconds > 0 and measured.model_gib > 0 and measured.trained_parameters > 0


@pytest.mark.nightly
def test_the_bench_runs_a_dit_trainer_at_two_depths_and_prints_its_row():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_memory.py"), "--scale", "tiny",
                          "--resolution", "32", "--trainers", "PVAIdentityTune", "--families", "sd35",
                          "--checkpointing", "on", "--steps", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| PVAIdentityTune")]
    assert len(rows) == 1, out.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert len(cells) == 14 and all(cells), cells
    assert cells[1:4] == ["SD3.5 Large (tiny)", "32", "on"] and cells[-1].startswith("extrapolated to 4 units")

"""Peak memory and seconds of one real optimizer step of every trainer on every family it takes, at the native
resolutions (issue 24): what a user's machine needs. Printed next to 24 and 12 GiB; never asserted in tests.

What runs: each trainer's own prepare function and step function (bench/trainer_runs.py), through the real ComfyUI,
batch 1 (one micro-batch of one sample per optimizer step; PVA: one target with its reference), AdamW over what the
trainer trains. The diffusion model is ComfyUI's own class at the family's real config with random weights (their
values do not change the cost): SD1.5 (860 M) and SDXL (2.6 B) U-Nets at full size (PVA: the 9-channel inpainting
input); the DiTs at full width with a few blocks, Flux.1 dev (width 3072; a depth unit is one double and two single
blocks, the full model 19 units) and SD3.5 Large (width 2432; one joint block a unit, the full model 38). Each DiT
configuration is measured at two depths (``--depths``, units) and extrapolated linearly to the full depth: per unit =
difference / depth difference, and the table prints that per-unit cost (give three depths to see the linear fit's
largest residual). Text encoders, VAE and image encoders are the test harness's (SD1.5: full CLIP-L and VAE; SDXL:
ComfyUI's CLIP-L + CLIP-G 3 layers deep; Flux / SD3.5: ComfyUI's encoders with a 1-layer T5-XXL of the real width
4096; a tiny CLIP vision model): they run before the step (the trainers encode their data once) and are not counted,
but the shapes they give are the real ones (SD1.5 77 x 768, SDXL 77 x 2048 + pooled 1280, Flux T5 256 x 4096 as
ComfyUI pads a short caption, SD3.5 154 x 4096; a caption of more than 256 T5 tokens makes Flux's 512). The tiny
image encoder's width sets the input layer of RealCustom's projector and of PVA's token transformer, so those layers
are smaller than with ViT-L (a few MB of trainables; every other trained tensor has its real size).

Measured: every configuration in its own spawned child process. Peak = the high-water mark during the steps (reset
after the trainer's preparation, so its one-time VAE encoding does not count) above the process's memory before the
diffusion model was built, so it holds the model's weights, the trainer's trainables, gradients, AdamW state and the
step's activations: resident memory (RSS) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. On the CPU
ComfyUI keeps the weights in fp32 (twice a GPU's bf16). Seconds: the median wall time of the steps after the first
(the only one with ``--steps 1``), and its CPU time (on a shared machine wall time stretches, CPU time does not).
The ``estimate`` column is the hook for the pre-flight memory estimate: it reads ``preflight_estimate_gib``.

Usage: .venv/bin/python bench/train_memory.py [--trainers DisenDiff,DETEX,RealCustom,PVATrainer,PVAIdentityTune]
       [--families sd15,sdxl,flux,sd35] [--checkpointing both|on|off] [--resolution PX] [--depths 1,2] [--steps 2]
       [--scale full|tiny]
``--scale tiny`` runs the test harness's tiny models instead (the smoke test; the DiTs extrapolated to twice the
largest depth measured); ``--resolution`` replaces every native resolution. On one core of a 2-core CPU, SD1.5 at 512 px takes about a minute per configuration, SDXL at
1024 px needs more than its 10.4 GB of fp32 weights plus activations; the DiTs at 1024 px take minutes per block.
"""
from __future__ import annotations

import argparse
import gc
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from timing import optimizer_steps, peak_since, start_peak_tracking  # noqa: E402 (needs the path above)
from trainer_runs import detex_run, disendiff_run, pva_run, realcustom_run  # noqa: E402

GIB = 2 ** 30
BUDGETS_GIB = (24, 12)
#: the targets of issue 24 (printed, never asserted): every trainer on its largest family at its native resolution,
#: and the SD1.5 trainers at 512 px
TARGET_GIB = {"largest family": 22, "sd15": 10}
NATIVE_RESOLUTIONS = {"sd15": (512,), "sdxl": (1024,), "flux": (1024, 512), "sd35": (1024,)}
#: the families each trainer takes (nodes/family_support.py), smallest to largest
TRAINER_FAMILIES = {"DisenDiff": ("sd15", "sdxl"), "DETEX": ("sd15",),
                    "RealCustom": ("sd15", "sdxl", "sd35", "flux"), "PVATrainer": ("sd15", "sdxl", "sd35", "flux"),
                    "PVAIdentityTune": ("sd15", "sdxl", "sd35", "flux")}
#: trainers with a gradient_checkpointing switch (all of them)
CHECKPOINTING_TRAINERS = ("DisenDiff", "DETEX", "RealCustom", "PVATrainer", "PVAIdentityTune")
#: depth units of the full DiTs (Flux.1 dev: 19 double + 38 single blocks, a unit being one double and two single)
FULL_DEPTH = {"flux": 19, "sd35": 38}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux.1 dev", "sd35": "SD3.5 Large"}

#: ComfyUI's SDXL U-Net (comfy.model_detection's SDXL layout)
SDXL_FULL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False)
#: Flux.1 dev's transformer with ``depth`` units
FLUX_FULL = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True)
#: SD3.5 Large's MMDiT: ComfyUI derives width 64 x depth and depth heads; num_blocks builds fewer joint blocks
SD35_LARGE = dict(in_channels=16, out_channels=16, patch_size=2, depth=38, input_size=None, adm_in_channels=2048,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 2432}},
                  num_patches=36864, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None,
                  x_block_self_attn_layers=[])


@dataclass(frozen=True)
class Configuration:
    trainer: str
    family: str
    resolution: int
    checkpointing: Optional[bool]  # None: the trainer has no switch
    depth: Optional[int]  # DiT depth units built; None: the full U-Net
    scale: str = "full"


@dataclass(frozen=True)
class Measurement:
    peak_gib: float
    seconds: float
    cpu_seconds: float
    model_gib: float  # the diffusion model's weights as loaded
    trained_parameters: int
    device: str


def preflight_estimate_gib(configuration: Configuration) -> Optional[float]:
    """The pre-flight estimate of a configuration's peak (issue 24); None until the trainers have one."""
    return None


# ---------------------------------------------------------------- models (child process)


def unet_config(family: str, scale: str, in_channels: int) -> tuple[str, dict]:
    """ComfyUI's model config class and U-Net config of ``family`` at ``scale``."""
    from harness import checkpoints
    from whole_step import SD15_FULL_UNET

    config = {("sd15", "full"): SD15_FULL_UNET, ("sdxl", "full"): SDXL_FULL_UNET,
              ("sd15", "tiny"): checkpoints.SD15_UNET, ("sdxl", "tiny"): checkpoints.SDXL_UNET}[family, scale]
    return {"sd15": "SD15", "sdxl": "SDXL"}[family], dict(config, in_channels=in_channels)


def dit_config(family: str, scale: str, depth: int) -> tuple[str, dict]:
    """ComfyUI's model config class and the DiT config of ``family`` at ``scale`` with ``depth`` units."""
    from harness import dit

    if family == "flux":
        base = FLUX_FULL if scale == "full" else dit.flux_config("dev")
        return "Flux", dict(base, depth=depth, depth_single_blocks=2 * depth)
    base = SD35_LARGE if scale == "full" else dit.sd35_config("large")
    return "SD3", dict(base, num_blocks=depth)


def diffusion_model(configuration: Configuration):
    """ModelPatcher of ComfyUI's model class of the configuration's family, random weights, in the dtype ComfyUI
    picks for the device (as its loaders make it)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from harness import checkpoints, dit

    family = configuration.family
    if family in FULL_DEPTH:
        class_name, config = dit_config(family, configuration.scale, configuration.depth)
    else:
        class_name, config = unet_config(family, configuration.scale, 9 if configuration.trainer.startswith("PVA") else 4)
    model_config = getattr(comfy.supported_models, class_name)(config)
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(supported_dtypes=model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    model = model_config.get_model({})
    if family in FULL_DEPTH:
        dit.randomize_(model.diffusion_model, seed=0, std=None)
        if family == "sd35":
            net = model.diffusion_model
            with torch.no_grad():
                net.pos_embed.copy_(dit.sd3_pos_embed(net.hidden_size, config["pos_embed_max_size"]))
    else:
        checkpoints.randomize_(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def encoders(family: str):
    """(clip, vae) of the test harness for ``family``."""
    from harness import checkpoints, dit, text_encoders

    if family == "sd15":
        return checkpoints.load_sd15()[1:]
    if family == "sdxl":
        return text_encoders.reduced_clip("sdxl"), checkpoints.load_sd15()[2]
    return (dit.flux_clip() if family == "flux" else dit.sd35_clip()), dit.vae()


def trainer_run(configuration: Configuration, model, clip, vae):
    size, checkpointing = configuration.resolution, configuration.checkpointing
    if configuration.trainer == "DisenDiff":
        return disendiff_run(model, clip, vae, size, 1, 1, checkpointing=checkpointing)
    if configuration.trainer == "DETEX":
        return detex_run(model, clip, vae, size, 1, 1, checkpointing=checkpointing)
    if configuration.trainer == "RealCustom":
        return realcustom_run(model, clip, vae, size, 1, checkpointing)
    return pva_run(model, clip, vae, size, configuration.trainer == "PVATrainer", checkpointing)


def measure(configuration: Configuration, steps: int) -> Measurement:
    """One configuration in this (child) process: build, prepare, ``steps`` optimizer steps."""
    import torch
    from harness.comfy_env import boot_comfy, pack_module
    from harness.memory import trim_heap

    boot_comfy(cpu=not torch.cuda.is_available())
    glue = pack_module("nodes.training_glue")
    clip, vae = encoders(configuration.family)
    gc.collect()
    trim_heap()
    baseline = start_peak_tracking()
    cuda_baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    model = diffusion_model(configuration)
    model_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    with glue.training_mode():
        run = trainer_run(configuration, model, clip, vae)
    step = optimizer_steps(run.step, run.optimizer, 1)
    gc.collect()
    trim_heap()  # what the preparation freed goes back to the system, or the resident set would still hold it
    start_peak_tracking()  # the preparation's one-time peaks (VAE encoding) are not the step's
    wall, cpu = [], []
    for index in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(index)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = peak_since(baseline)
    timed = slice(1, None) if steps > 1 else slice(None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak_gib = peak.rss_mib / 1024 if peak.cuda_mib is None else peak.cuda_mib / 1024 - cuda_baseline / GIB
    return Measurement(peak_gib,
                       statistics.median(wall[timed]), statistics.median(cpu[timed]), model_bytes / GIB,
                       sum(t.numel() for t in run.trained.values()), device)


def _measure_and_send(connection, configuration: Configuration, steps: int) -> None:
    """Child process: send :func:`measure`'s result, or the error that stopped it."""
    try:
        connection.send(measure(configuration, steps))
    except Exception as error:  # noqa: BLE001 (re-raised in the parent)
        connection.send(RuntimeError(f"{type(error).__name__}: {error}"))


def measured_in_child(configuration: Configuration, steps: int) -> Measurement:
    """:func:`measure` in a fresh spawned process, so no other configuration's memory counts; the child is stopped
    when this process is interrupted (a time limit's SIGTERM)."""
    context = get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_measure_and_send, args=(child_end, configuration, steps))
    process.start()
    child_end.close()  # this process's copy: without it a child that dies leaves recv() waiting forever
    try:
        result = parent_end.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the child process died (exit code {process.exitcode}; -9: killed, e.g. out of memory)") \
            from None
    finally:
        if process.is_alive():
            process.terminate()
        process.join()
    if isinstance(result, Exception):
        raise result
    return result


# ---------------------------------------------------------------- plan and table (parent process)


def configurations(args) -> list[Configuration]:
    switches = {"both": (True, False), "on": (True,), "off": (False,)}[args.checkpointing]
    plan = []
    for trainer in args.trainers:
        for family in TRAINER_FAMILIES[trainer]:
            if family not in args.families:
                continue
            for resolution in (args.resolution,) if args.resolution else NATIVE_RESOLUTIONS[family]:
                for checkpointing in switches if trainer in CHECKPOINTING_TRAINERS else (None,):
                    for depth in args.depths if family in FULL_DEPTH else (None,):
                        plan.append(Configuration(trainer, family, resolution, checkpointing, depth, args.scale))
    return plan


@dataclass(frozen=True)
class Row:
    configuration: Configuration  # depth: the depth extrapolated to (None for U-Nets)
    peak_gib: float
    seconds: float
    cpu_seconds: float
    model_gib: float
    trained_parameters: int
    note: str


def linear_fit(depths: list[int], values: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, largest absolute residual) of the least-squares line through (depth, value)."""
    mean_d, mean_v = statistics.fmean(depths), statistics.fmean(values)
    slope = (sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values))
             / sum((d - mean_d) ** 2 for d in depths))
    intercept = mean_v - slope * mean_d
    return intercept, slope, max(abs(intercept + slope * d - v) for d, v in zip(depths, values))


def rows(results: dict[Configuration, Measurement]) -> list[Row]:
    """One row per configuration; the DiT depths of a configuration become one row extrapolated to the full depth."""
    groups: dict[Configuration, dict[int, Measurement]] = {}
    for configuration, measurement in results.items():
        key = Configuration(configuration.trainer, configuration.family, configuration.resolution,
                            configuration.checkpointing, None, configuration.scale)
        groups.setdefault(key, {})[configuration.depth] = measurement
    table = []
    for key, by_depth in groups.items():
        if None in by_depth:
            m = by_depth[None]
            table.append(Row(key, m.peak_gib, m.seconds, m.cpu_seconds, m.model_gib, m.trained_parameters, "measured"))
            continue
        depths = sorted(by_depth)
        if len(depths) < 2:  # the run stopped after one depth: nothing to extrapolate from
            m = by_depth[depths[0]]
            table.append(Row(Configuration(key.trainer, key.family, key.resolution, key.checkpointing, depths[0],
                                           key.scale), m.peak_gib, m.seconds, m.cpu_seconds, m.model_gib,
                             m.trained_parameters, f"measured at depth {depths[0]} only: not extrapolated"))
            continue
        full = FULL_DEPTH[key.family] if key.scale == "full" else 2 * depths[-1]

        def extrapolated(field):
            intercept, slope, residual = linear_fit(depths, [getattr(by_depth[d], field) for d in depths])
            return intercept + slope * full, slope, residual
        peak, peak_slope, peak_residual = extrapolated("peak_gib")
        seconds, seconds_slope, _ = extrapolated("seconds")
        cpu_seconds, _, _ = extrapolated("cpu_seconds")
        model_gib, _, _ = extrapolated("model_gib")
        trained, _, _ = extrapolated("trained_parameters")
        measured = ", ".join(f"{d}: {by_depth[d].peak_gib:.2f} GiB {by_depth[d].seconds:.1f} s" for d in depths)
        note = (f"extrapolated to {full} units from depths {measured}; per unit {peak_slope:.3f} GiB, "
                f"{seconds_slope:.2f} s" + (f"; linear fit's largest residual {peak_residual:.3f} GiB"
                                            if len(depths) > 2 else ""))
        table.append(Row(Configuration(key.trainer, key.family, key.resolution, key.checkpointing, full, key.scale),
                         peak, seconds, cpu_seconds, model_gib, round(trained), note))
    return table


def describe(table: list[Row], device: str) -> str:
    header = ["trainer", "family", "px", "ckpt", "peak GiB", "estimate", *(f"<= {b}" for b in BUDGETS_GIB),
              "s/step", "cpu s", "model GiB", "trained M", "trained MiB fp32", "how"]
    lines = [f"device: {device}; batch 1, one micro-batch per optimizer step; GiB = 2^30 bytes",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        c = row.configuration
        estimate = preflight_estimate_gib(c)
        cells = [c.trainer, FAMILY_NAMES[c.family] + ("" if c.scale == "full" else " (tiny)"), str(c.resolution),
                 {None: "n/a", True: "on", False: "off"}[c.checkpointing], f"{row.peak_gib:.2f}",
                 "n/a" if estimate is None else f"{estimate:.2f}",
                 *("yes" if row.peak_gib <= b else "no" for b in BUDGETS_GIB),
                 f"{row.seconds:.2f}", f"{row.cpu_seconds:.2f}", f"{row.model_gib:.2f}",
                 f"{row.trained_parameters / 1e6:.2f}", f"{row.trained_parameters * 4 / 2 ** 20:.1f}", row.note]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("peak: above the process before the diffusion model was built (its weights, the trained tensors, their "
                 "gradients and AdamW state, the step's activations); s/step: wall time, cpu s: CPU time; a DiT unit "
                 "is one double and two single blocks of Flux.1 dev (19 in the model), one joint block of SD3.5 Large "
                 "(38), and its rows are extrapolated linearly from the depths measured (how)")
    lines.append(f"targets (issue 24, not asserted): every trainer <= {TARGET_GIB['largest family']} GiB on the largest "
                 f"family it takes at its native resolution; SD1.5 trainers <= {TARGET_GIB['sd15']} GiB at 512 px")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", default=",".join(TRAINER_FAMILIES))
    parser.add_argument("--families", default=",".join(FAMILY_NAMES))
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--resolution", type=int, default=0, help="replaces every native resolution (0: native)")
    parser.add_argument("--depths", default="1,2", help="DiT depth units measured (two or more)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration (the first untimed)")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    args = parser.parse_args()
    args.trainers, args.families = args.trainers.split(","), args.families.split(",")
    args.depths = sorted({int(d) for d in args.depths.split(",")})
    unknown = sorted(set(args.trainers) - set(TRAINER_FAMILIES)) + sorted(set(args.families) - set(FAMILY_NAMES))
    if unknown or len(args.depths) < 2:
        parser.error(f"unknown trainers or families {unknown}" if unknown else "--depths needs two depths or more")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    results, failures = {}, []
    signal.signal(signal.SIGTERM, _interrupt)  # a time limit (timeout) still gets the table of what was measured
    plan = configurations(args)
    for index, configuration in enumerate(plan):
        try:  # one configuration that does not fit (its child killed for memory) must not lose the others
            m = results[configuration] = measured_in_child(configuration, args.steps)
            print(f"measured {configuration}: peak {m.peak_gib:.2f} GiB, {m.seconds:.2f} s", flush=True)
        except KeyboardInterrupt:
            failures.append(f"stopped while measuring {configuration}; {len(plan) - index - 1} configurations left")
            break
        except Exception as error:  # noqa: BLE001 (reported in the table's footer)
            failures.append(f"not measured: {configuration}: {error}")
            print(failures[-1], flush=True)
    devices = {m.device for m in results.values()} or {"none"}
    print(describe(rows(results), ", ".join(sorted(devices))))
    print("\n".join(failures))


if __name__ == "__main__":
    main()

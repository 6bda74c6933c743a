"""Whole sampling steps on a FULL-SIZE SD1.5 U-Net: what a user pays per step (ratios printed, never asserted).

The U-Net is ComfyUI's own UNetModel with the real SD1.5 config (860 M parameters, random weights), fp32 on
the CPU, fp16 on a GPU; sampled with ComfyUI's KSampler (euler, CFG 7, so the U-Net batch is twice the
images), at ``--size`` px (512: a 64x64 latent). Configurations:

- plain: the unpatched model;
- StyleAligned: ``SharedAttentionBatch`` (defaults) and, for comparison, the official formulation written as
  a plain attn1 replace on every self-attention layer (the released SharedAttentionProcessor: AdaIN of
  queries and keys toward each chunk's first image, then ONE SDPA over keys/values concatenated with that
  image's); target ours / official <= 1.10;
- AdaptiveMaskGuidance (a random adapter for every cross-attention layer, 257 reference tokens as CLIP
  ViT-L/14 gives): the node for each ``map_source``, against the same image branch ungated (all-ones mask,
  no map read, no extra pass), per step and over a 25-step run (first step included): "text-only pass"
  pays an extra cond-only U-Net pass per updating step, "previous step" one such pass at step 0;
- ParallelVisualAttention (a PVA file initialised as the paper does, 10 identity tokens): patched / plain
  (uncond rows without identity, the default); target <= 1.10.

Timing: every configuration samples ``--steps`` steps per round, and the rounds go through all
configurations in turn, so load from other jobs on a shared machine hits them alike. A configuration's
seconds per step is its lowest over the rounds of the mean of the steps after the first (step ends taken
from ComfyUI's progress hook); the first step's extra (sampler set-up and warm-up, AdaptiveMaskGuidance's
one text-only pass of "previous step" mode) is printed apart. Wall time and this process's CPU time (user +
system, and user alone) are taken; on the CPU the ratios use CPU time, which other jobs on a shared machine do
not stretch (run with OMP_NUM_THREADS=1 there, so idle threads' spinning does not count either); on a GPU,
wall time.
The prompts are random conditionings of CLIP-L's shape (their values do not change the cost).

Usage: .venv/bin/python bench/whole_step.py [--size 512] [--batch 4] [--steps 2] [--rounds 2]
       [--only style_aligned,mask_guidance,pva]
On one core of a 2-core AMD EPYC VM a plain step at the defaults takes about 80 s of CPU time and the default
run about an hour; ``--only pva --rounds 1`` takes minutes, and ``--size 256 --batch 2 --rounds 1`` runs every
configuration in a few minutes (smaller latents make attention a smaller share of the step). Memory: the fp32
U-Net's 3.4 GB plus about 1.5 GB at 512 px.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from timing import user_cpu_time  # noqa: E402 (bench/ is on the path: scripts run from it)

#: ComfyUI's own SD1.5 U-Net config (comfy.model_detection's SD15 entry); SD15 adds num_heads 8.
SD15_FULL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False)
PROMPT = "a photo of a toy on the beach"
CFG = 7.0
#: a typical run's steps (RealCustom's released app: 25), over which one-time first-step work is spread
RUN_STEPS = 25
REFERENCE_TOKENS = 257  # CLIP ViT-L/14 penultimate tokens of a 224-px reference
GROUPS = ("style_aligned", "mask_guidance", "pva")


def full_sd15():
    """ModelPatcher of ComfyUI's SD1.5 model class with the full U-Net, random weights, dtype as ComfyUI picks."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from harness.checkpoints import randomize_

    config = comfy.supported_models.SD15(dict(SD15_FULL_UNET))
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model({})
    randomize_(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def tokenizer_only_clip():
    """A CLIP of ComfyUI's class with SD1.5's own tokenizer and no text model: AdaptiveMaskGuidance only
    tokenizes the prompt, and the conditionings are random (their values do not change the cost)."""
    import comfy.sd
    import comfy.sd1_clip

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = comfy.sd1_clip.SD1Tokenizer(), {}
    return clip


def random_conditioning(seed: int) -> list:
    """CONDITIONING of CLIP-L's shape, (1, 77, 768)."""
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def official_shared_attention(q, k, v, extra_options):
    """StyleAligned's released SharedAttentionProcessor (default settings) as an attn1 replace: per cond/uncond
    chunk, AdaIN of queries and keys toward the chunk's first image (per channel over tokens), keys and values
    concatenated with that image's, one attention call."""
    from comfy.ldm.modules.attention import optimized_attention

    chunks = len(extra_options["cond_or_uncond"])

    def adain(x):
        x = x.unflatten(0, (chunks, -1))
        mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + 1e-5).sqrt()
        return ((x - mean) / std * std[:, :1] + mean[:, :1]).flatten(0, 1)

    def with_first(x):
        x = x.unflatten(0, (chunks, -1))
        return torch.cat([x, x[:, :1].expand_as(x)], dim=2).flatten(0, 1)

    return optimized_attention(adain(q), with_first(adain(k)), with_first(v), extra_options["n_heads"])


def style_aligned_models(model) -> dict:
    from harness.comfy_env import pack_module
    from harness.pack_nodes import shared_attention

    official = model.clone()
    for block in pack_module("nodes.patching").transformer_blocks(model):
        official.set_model_attn1_replace(official_shared_attention, *block.key)
    return {"StyleAligned (ours)": shared_attention(model), "StyleAligned (official)": official}


def mask_guidance_models(model, clip, batch: int) -> dict:
    """The branch ungated, then AdaptiveMaskGuidance with each map_source, all with one random adapter."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension
    from harness.checkpoints import randomize_
    from harness.comfy_env import pack_module
    from harness.pack_nodes import run_node

    realcustom, weights = pack_module("attention.realcustom"), pack_module("attention.realcustom_weights")
    nodes, patching = pack_module("nodes.realcustom"), pack_module("nodes.patching")
    cross = [b for b in patching.transformer_blocks(model) if b.has_cross_attention]
    token_dim = 768
    adapter = weights.RealCustomAdapter(weights.CLIP_VISION_FORMAT, weights.LinearProjector(1024, token_dim),
                                        realcustom.ImageBranchWeights({b.key: (b.channels, token_dim) for b in cross}))
    randomize_(adapter, seed=1, std=0.05)
    loaded = nodes.LoadedAdapter(adapter, comfy.model_patcher.ModelPatcher(
        adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()), "bench adapter")
    gen = torch.Generator().manual_seed(2)
    tokens = realcustom.ImageTokens(torch.randn(1, REFERENCE_TOKENS, token_dim, generator=gen),
                                    torch.randn(1, REFERENCE_TOKENS, token_dim, generator=gen))
    reference = nodes.EncodedReference(loaded, tokens)

    ungated = model.clone()
    patching.add_attention_processor(ungated, realcustom.MaskedImageBranch(adapter.branch), cross)
    ungated.set_additional_models("bench.realcustom", [loaded.patcher])
    run = realcustom.TrainingRun(tokens.to(mm.get_torch_device()), torch.ones(batch, 1, 1))
    ungated.model_options["transformer_options"][realcustom.RUN_KEY] = run
    models = {"AMG ungated branch": ungated}
    for source in nodes.MAP_SOURCES:
        models[f"AMG guided, {source}"] = run_node(
            "AdaptiveMaskGuidance", model=model, reference=reference, clip=clip, prompt=PROMPT, word="toy",
            mask_strategy="max_norm", mask_scope=0.25, binary_mask=False, update_fraction=1.0, map_source=source,
            uncond_image="black image", strength=1.0)[0]
    return models


def pva_models(model) -> dict:
    import comfy.model_management as mm
    import comfy.model_patcher
    from harness.comfy_env import pack_module
    from harness.pack_nodes import run_node
    from harness.pva_assets import CLIP_VISION_CONFIG, PVA_DEFAULTS, faces, tiny_clip_vision

    pva_weights, patching = pack_module("attention.pva_weights"), pack_module("nodes.patching")
    blocks = [b for b in patching.transformer_blocks(model) if b.has_cross_attention]
    projections = pack_module("nodes.pva").parallel_projections(model, blocks)
    weights = pva_weights.PVAWeights.initial(projections, "clip_vision", CLIP_VISION_CONFIG["projection_dim"],
                                             {"l": torch.randn(1, 768)}, seed=3, layers=1, feedforward=64)
    weights.float()
    loaded = pack_module("nodes.pva").LoadedPVA("bench pva", weights, comfy.model_patcher.ModelPatcher(
        weights, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()))
    patched = run_node("ParallelVisualAttention", model=model, pva=loaded, references=faces(2),
                       clip_vision=tiny_clip_vision(), **PVA_DEFAULTS)[0]
    return {"PVA": patched}


#: the clocks of a run: wall time; this process's CPU time (user + system: on one thread what the step takes on
#: an idle machine, page faults of fresh tensors included), and its user part (which reclaim under other
#: jobs' memory pressure does not inflate)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "user": user_cpu_time}


class StepClock:
    """Step end times of a sampling run on both clocks, from ComfyUI's progress hook (CUDA work waited for)."""

    def __init__(self):
        self.ends: list[dict[str, float]] = []

    def now(self) -> dict[str, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {name: clock() for name, clock in CLOCKS.items()}

    def __call__(self, value, total, preview=None, node_id=None):
        self.ends.append(self.now())


def timed_run(model, positive, negative, latent, steps: int) -> dict[str, tuple[float, float]]:
    """Per clock: (mean seconds of the steps after the first, first step's seconds) of one KSampler run."""
    import comfy.utils
    from harness.checkpoints import sample

    clock = StepClock()
    comfy.utils.set_progress_bar_global_hook(clock)
    try:
        ends = [clock.now()]
        sample(model, positive, negative, latent, seed=1, steps=steps, cfg=CFG)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    ends += clock.ends[-steps:]
    result = {}
    for name in CLOCKS:
        durations = [b[name] - a[name] for a, b in zip(ends, ends[1:])]
        result[name] = (statistics.mean(durations[1:]), durations[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in px (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=4, help="images per run (StyleAligned: reference + others)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per run (>= 2: the first is apart)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all configurations")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated: " + ", ".join(GROUPS))
    args = parser.parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if args.steps < 2 or args.rounds < 1 or not set(groups) <= set(GROUPS):
        parser.error(f"--steps must be >= 2, --rounds >= 1, --only a subset of {GROUPS}")

    from harness.comfy_env import boot_comfy
    boot_comfy(cpu=not torch.cuda.is_available())
    import comfy.model_management as mm
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars; the progress hook still sees every step
    from harness import checkpoints

    started = time.perf_counter()
    model = full_sd15()
    positive, negative = random_conditioning(0), random_conditioning(1)
    latent = checkpoints.empty_latent(args.batch, args.size, args.size)
    models = {"plain": model}
    if "style_aligned" in groups:
        models.update(style_aligned_models(model))
    if "mask_guidance" in groups:
        models.update(mask_guidance_models(model, tokenizer_only_clip(), args.batch))
    if "pva" in groups:
        models.update(pva_models(model))
    mm.unload_all_models()  # the PVA identity encoder, needed by the node only
    gc.collect()
    device = mm.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}, torch {torch.__version__}, U-Net {model.model.get_dtype()}, {args.size} px, batch "
          f"{args.batch}, CFG {CFG:g} (U-Net batch {2 * args.batch}), euler, {args.steps} steps x {args.rounds} "
          f"rounds; set-up {time.perf_counter() - started:.0f} s", flush=True)

    # CPU: the process's CPU time is the work (other jobs only stretch the wall time); GPU: wall time
    primary = "wall" if device.type == "cuda" else "cpu"
    times = {n: {clock: [] for clock in CLOCKS} for n in models}
    for round_index in range(args.rounds):
        for config, patched in models.items():
            measured = timed_run(patched, positive, negative, latent, args.steps)
            for clock, value in measured.items():
                times[config][clock].append(value)
            print(f"  round {round_index} {config}: " + ", ".join(
                f"{clock} {steady:.3f} s/step (first {first:.3f} s)" for clock, (steady, first) in measured.items()),
                flush=True)

    def lowest(config, clock, part=0):
        return min(t[part] for t in times[config][clock])

    best = {n: lowest(n, primary) for n in models}
    print(f"\nseconds per step, lowest over rounds of the steps after the first ({primary} time rules the ratios); "
          "first step's extra:")
    for config in models:
        print(f"  {config:28s} " + "  ".join(f"{clock} {lowest(config, clock):8.3f}" for clock in CLOCKS)
              + f"   first step {lowest(config, primary, 1) - best[config]:+.3f}")

    def run_seconds(config):
        """A whole run's seconds: its first step (one-time work such as the step-0 text-only pass) and the rest."""
        return lowest(config, primary, 1) + (RUN_STEPS - 1) * best[config]

    def ratio(top, bottom, note=""):
        user = "" if primary == "wall" else f" (user time alone {lowest(top, 'user') / lowest(bottom, 'user'):.3f})"
        print(f"  {top} / {bottom}: {best[top] / best[bottom]:.3f}{user}{note}")

    print("ratios:")
    if "style_aligned" in groups:
        ratio("StyleAligned (ours)", "StyleAligned (official)", "  (target <= 1.10)")
        ratio("StyleAligned (ours)", "plain")
        ratio("StyleAligned (official)", "plain")
    if "mask_guidance" in groups:
        for config in models:
            if config.startswith("AMG guided"):
                ratio(config, "AMG ungated branch")
                print(f"    over a {RUN_STEPS}-step run, first step included: "
                      f"{run_seconds(config) / run_seconds('AMG ungated branch'):.3f}")
        ratio("AMG ungated branch", "plain")
    if "pva" in groups:
        ratio("PVA", "plain", "  (target <= 1.10)")


if __name__ == "__main__":
    main()

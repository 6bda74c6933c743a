"""AdaptiveMaskGuidance and ParallelVisualAttention on Flux's joint attention at real size; prints ratios measured
in one run (never asserted in tests).

One joint-attention call of a Flux double block at 1024 px: 24 heads x 128, 512 text (T5) + 4096 image tokens,
q/k/v as Flux hands them ((B, heads, L, d), RoPE applied), batch 1 (Flux dev samples at CFG 1; ``--cfg`` adds an
uncond row). Flux runs 19 double + 38 single blocks, each with a joint attention over the same 4608 tokens, so
one call is 1/57 of a forward's joint attention. Every configuration goes through the pack's
JointAttentionDispatcher (with the node glue's check of ComfyUI's exact attention functions) and ComfyUI's PyTorch
attention function (SDPA: the default on NVIDIA GPUs, ``--use-pytorch-cross-attention`` elsewhere; unwrapped, as
``wrap_attn`` hands it an override), with the real processors:

- plain: ComfyUI's attention function on the call as Flux makes it (no override);
- ungated: AdaptiveMaskGuidance's image branch (WordMapReader + MaskedImageBranch, 257 reference tokens of
  T5's 4096 channels, as the trainer makes a Flux adapter) with an all-ones mask and no map read: the plain
  joint attention through the fused function plus the branch (``parallel_output``);
- guided: the same branch gated by a mask while the word map is read in the same pass (the "previous step"
  source): the cross view's logits of the image queries against all joint keys, their softmax, the map;
- pva softmax: PVA's 10 identity keys in the joint softmax of the image queries (the plain call's kernel returning
  its log-sum-exp, the identity keys merged in; where no such kernel serves, one fused call over widened heads),
  with the parallel queries and identity keys the processor projected in its first call served again;
- pva: ParallelVisualAttentionProcessor with the block's JointParallelProjection (hidden 3072, per-head RMS
  norms), its parallel query projection of the 4096 image tokens, norm and rotation included in every call.

Ratios: (1) guided / ungated, target <= 1.10; (2) pva softmax / plain, target <= 1.10; (3) pva / plain,
what the user pays in this call. Calls are timed in turns, best of ``--repeats`` (on the CPU by this process's
CPU time: run with OMP_NUM_THREADS=1 on a shared machine). ``--heads`` runs a fraction of the 24 heads (same
head width and token counts; the projections keep Flux's 3072 hidden width). On one core of a 2-core AMD EPYC
VM a full-size plain call takes about 2.3 s of CPU time, the default run 2 minutes (the guided call's logits, 1.8 GB per image, are made in 64 MiB row chunks: attention.joint).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/flux_joint_attention.py [--repeats N] [--heads H] [--cfg]
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from timing import best_of_interleaved, parse_bench_args, work_clock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@dataclass(frozen=True)
class JointCallSize:
    """One joint-attention call of a Flux double block (defaults: 1024 px, 512 T5 tokens)."""

    heads: int = 24
    head_dim: int = 128
    text: int = 512
    grid: tuple[int, int] = (64, 64)
    hidden: int = 3072  # the block's width, input of its (and PVA's parallel) query projection
    reference_tokens: int = 257  # RealCustom: CLIP ViT-L/14 tokens of a 224-px reference
    token_dim: int = 4096  # RealCustom's projected tokens on Flux: the T5 context width
    identity_tokens: int = 10  # PVA's identity tokens per face

    @property
    def image(self) -> int:
        return self.grid[0] * self.grid[1]


ALL_BLOCKS = 19 + 38  # Flux's double + single blocks, each with one such joint attention


def joint_calls(size: JointCallSize, cond_or_uncond: tuple[int, ...], device: str,
                guided_mask: float | None = None, attention_name: str = "pytorch") -> dict[str, Callable]:
    """The configurations (module docstring) as calls returning their (B, L, heads * d) output; the guided mask
    is random, or ``guided_mask`` everywhere; ``attention_name``: ComfyUI's attention function the calls use,
    "pytorch" or "comfyui" (the one ComfyUI picked on this machine)."""
    from harness.comfy_env import pack_module

    dispatcher, joint, realcustom, pva, head_norm, blocks = (
        pack_module(f"attention.{m}") for m in ("dispatcher", "joint", "realcustom", "pva", "head_norm", "blocks"))
    rows = 1  # images per cond/uncond chunk
    batch = rows * len(cond_or_uncond)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # Flux's own dtype on a GPU
    length, inner = size.text + size.image, size.heads * size.head_dim
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the projections' default initialisation

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, k, v = (randn(batch, size.heads, length, size.head_dim) for _ in range(3))
    block = ("double", 0, 0)
    attention = comfy_attention_function(attention_name)
    override = joint.JointAttentionDispatcher(is_exact_attention=pack_module("nodes.comfy_features").computes_exact_attention)

    def options(*processors, **extra):
        chain = dispatcher.ProcessorChain()
        for processor in processors:
            chain = chain.with_processor(processor)
        return {dispatcher.CHAIN_KEY: chain, joint.LAYOUT_KEY: joint.LayoutRecord(joint.JointLayout(size.text, size.grid)),
                "cond_or_uncond": list(cond_or_uncond), "block_type": block[0], "block_index": block[1], **extra}

    def through_dispatcher(make_options):
        return lambda: override(attention, q, k, v, size.heads, skip_reshape=True, transformer_options=make_options())

    # AdaptiveMaskGuidance
    weights = realcustom.ImageBranchWeights({block: (inner, size.token_dim)}).to(device).requires_grad_(False)
    tokens = realcustom.ImageTokens(randn(1, size.reference_tokens, size.token_dim),
                                    randn(1, size.reference_tokens, size.token_dim))
    indicator = torch.zeros(size.text)
    indicator[5] = 1.0
    guidance = (realcustom.WordMapReader(), realcustom.MaskedImageBranch(weights))
    mask = torch.rand(rows, *size.grid, generator=gen).to(device)
    if guided_mask is not None:
        mask = torch.full_like(mask, guided_mask)

    def guided_run():
        run = realcustom.MaskGuidanceRun(realcustom.MaskSettings(), indicator, total_steps=25, update_fraction=1.0,
                                         text_only_pass=False, tokens=tokens)
        run.mask, run.capturing = mask, True
        return run

    ungated_run = realcustom.TrainingRun(tokens, mask=torch.ones(rows, 1, 1, device=device))

    # ParallelVisualAttention
    projection = pva.JointParallelProjection(size.hidden, inner, True, head_norm.HeadNorm("rms", size.head_dim),
                                             head_norm.HeadNorm("rms", size.head_dim)).to(device).requires_grad_(False)
    identities = randn(1, size.identity_tokens, size.hidden)
    projections = torch.nn.ModuleDict({pva.block_name(block): projection})
    inputs = joint.QueryInputs(blocks.FLUX.query_placement)
    inputs.image_tokens = randn(batch, size.image, size.hidden)
    angles = torch.rand(batch, 1, length, size.head_dim // 2, generator=gen).to(device) * 6
    inputs.positions = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                                    torch.stack([angles.sin(), angles.cos()], -1)], -2)  # Flux's pe layout

    @dataclass(frozen=True, eq=False)
    class IdentityKeysKept(pva.ParallelVisualAttentionProcessor):
        """PVA's processor serving the identity keys and parallel queries of its first call in every later one:
        the joint softmax without the projections."""

        kept: list = field(default_factory=list)

        def extra_key_values(self, queries, call):
            if not self.kept:
                self.kept.append(super().extra_key_values(queries, call))
            return self.kept[0]

    with_pva = {joint.QUERY_INPUTS_KEY: inputs}
    projected_once = IdentityKeysKept(projections, identities)
    projected_every_call = pva.ParallelVisualAttentionProcessor(projections, identities)
    return {
        "plain": lambda: attention(q, k, v, size.heads, skip_reshape=True),
        "ungated": through_dispatcher(lambda: options(*guidance, **{realcustom.RUN_KEY: ungated_run})),
        "guided": through_dispatcher(lambda: options(*guidance, **{realcustom.RUN_KEY: guided_run()})),
        "pva softmax": through_dispatcher(lambda: options(projected_once, **with_pva)),
        "pva": through_dispatcher(lambda: options(projected_every_call, **with_pva)),
    }


def measure(calls: dict[str, Callable], repeats: int, device: str) -> dict[str, float]:
    with torch.inference_mode():
        return best_of_interleaved(calls, repeats, work_clock(device))


def report(times: dict[str, float], size: JointCallSize, cond_or_uncond: tuple[int, ...], device: str,
           attention_name: str) -> list[str]:
    clock = "process CPU time" if device == "cpu" else "wall time"
    rows = "cond + uncond, batch 2" if len(cond_or_uncond) > 1 else "cond only, batch 1"
    seconds = ", ".join(f"{name} {t:.2f} s" for name, t in times.items())
    return [
        f"Flux double-block joint attention, {size.heads} of 24 heads x {size.head_dim}, {size.text} text + "
        f"{size.image} image tokens, {rows} (1/{ALL_BLOCKS} of a forward's joint attention), ComfyUI's "
        f"{comfy_attention_function(attention_name).__name__}; best of the calls in turns, {clock}: {seconds}",
        f"(1) AdaptiveMaskGuidance guided (map read in the same pass) / ungated branch: "
        f"{times['guided'] / times['ungated']:.3f} (target <= 1.10)",
        f"(2) ParallelVisualAttention joint softmax / plain joint attention: "
        f"{times['pva softmax'] / times['plain']:.3f} (target <= 1.10)",
        f"(3) ParallelVisualAttention with its parallel query projection / plain joint attention: "
        f"{times['pva'] / times['plain']:.3f} (what the user pays in this call)",
    ]


def comfy_attention_function(attention_name: str) -> Callable:
    """ComfyUI's PyTorch attention ("pytorch") or the one it picked on this machine ("comfyui"), unwrapped as
    wrap_attn hands it to an override."""
    import comfy.ldm.modules.attention as comfy_attention
    function = comfy_attention.attention_pytorch if attention_name == "pytorch" else comfy_attention.optimized_attention
    return function.__wrapped__


def main() -> None:
    from harness.comfy_env import boot_comfy

    def add_options(parser):
        parser.add_argument("--heads", type=int, default=24, help="heads of the 24 to run (same head width)")
        parser.add_argument("--cfg", action="store_true", help="cond + uncond rows (batch 2) instead of cond only")
        parser.add_argument("--attention", choices=("pytorch", "comfyui"), default="pytorch",
                            help="ComfyUI's PyTorch attention (SDPA), or the function ComfyUI picked on this machine")

    args, device = parse_bench_args(__doc__, add_options)
    boot_comfy(cpu=device == "cpu")
    size = JointCallSize(heads=args.heads)
    cond_or_uncond = (1, 0) if args.cfg else (0,)
    calls = joint_calls(size, cond_or_uncond, device, attention_name=args.attention)
    for line in report(measure(calls, args.repeats, device), size, cond_or_uncond, device, args.attention):
        print(line)


if __name__ == "__main__":
    main()

"""Transient memory of one cross-view call of the DiT joint-attention dispatcher at Flux's real size; prints the
numbers measured in one run (never asserted).

The cross view (attention/joint.py) serves logit editors and probability readers the float32 logits of the
latent's image queries against all joint keys: at Flux's 1024 px (24 heads x 128, 4096 image + 512 text
tokens) 1.8 GB per sample. It makes them in chunks of query rows (``CROSS_VIEW_CHUNK_BYTES``). This script runs
ONE joint attention call of that size, batch 1, through ``JointAttentionDispatcher`` with each processor set
below, each in a fresh process (so no run reuses another's freed heap), and prints the extra peak resident
memory of the call over its inputs (the kernel's high-water mark, reset before the call; CUDA allocator peak
on a GPU) and its time:

- calibration: CalibratedCrossAttn's logit edit (DisenDiff), its class maps surveyed over all chunks first;
- word map: AdaptiveMaskGuidance's word-map reader (RealCustom), reading the probabilities;
- calibration + word map: both in one call;
- calibration + StyleAligned: the calibration's edits handed to SharedAttentionBatch's softmax as a text
  bias (the owner's own attention counts too).

Each set runs with the chunk budget as shipped and with one chunk holding every row, which costs what the
unchunked view did with an editor alone (the code before the chunks also made the softmax twice when a reader
took part). Copied into a checkout without ``CROSS_VIEW_CHUNK_BYTES`` it measures that code as it is (both rows).

Usage: .venv/bin/python bench/cross_view_memory.py [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import types
from pathlib import Path

import torch
from timing import peak_since, start_peak_tracking

ROOT = Path(__file__).resolve().parents[1]
# The pure-torch packages need no ComfyUI: expose the repo as a namespace without running its __init__.
_package = types.ModuleType("personalization_nodes")
_package.__path__ = [str(ROOT)]
sys.modules.setdefault("personalization_nodes", _package)

HEADS, HEAD_DIM, IMAGE_GRID, TEXT_TOKENS = 24, 128, (64, 64), 512
PROMPT_LENGTH = 256  # Flux's T5 conditioning is padded to 256 tokens; 512 holds it twice
PROCESSOR_SETS = ("calibration", "word map", "calibration + word map", "calibration + StyleAligned")


def one_call(processor_set: str, one_chunk: bool, device: str, threads: int, connection) -> None:
    """Child process: build the inputs, then run one dispatcher call and send (extra peak MiB, CUDA MiB, s)."""
    torch.set_num_threads(threads)
    from personalization_nodes.attention import joint
    from personalization_nodes.attention.disendiff import CONTEXT_TOKENS_KEY, CalibratedCrossAttention, Concept
    from personalization_nodes.attention.dispatcher import CHAIN_KEY, ProcessorChain
    from personalization_nodes.attention.realcustom import (RUN_KEY, ImageTokens, MaskGuidanceRun, MaskSettings,
                                                            WordMapReader)
    from personalization_nodes.attention.sdpa import sdpa_attention
    from personalization_nodes.attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings

    if one_chunk and hasattr(joint, "CROSS_VIEW_CHUNK_BYTES"):
        joint.CROSS_VIEW_CHUNK_BYTES = 2 ** 62
    layout = joint.JointLayout(TEXT_TOKENS, IMAGE_GRID)
    length = TEXT_TOKENS + layout.image_tokens
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=gen).to(device) for _ in range(3))
    chain = ProcessorChain()
    if "calibration" in processor_set:
        chain = chain.with_processor(CalibratedCrossAttention((Concept((3,), (4,)), Concept((7,), (8, 9))), 1.0,
                                                              float("inf"), 0.0, PROMPT_LENGTH))
    if "word map" in processor_set:
        chain = chain.with_processor(WordMapReader())
    if "StyleAligned" in processor_set:
        chain = chain.with_processor(SharedAttentionProcessor(StyleAlignedSettings(), frozenset({("double", 0, 0)})))
    indicator = torch.zeros(PROMPT_LENGTH)
    indicator[[4, 5]] = 1.0
    run = MaskGuidanceRun(MaskSettings(), indicator, total_steps=1, update_fraction=1.0, text_only_pass=True,
                          tokens=ImageTokens(torch.zeros(1, 1, 8), None))
    run.capturing, run.injecting = True, False
    options = {CHAIN_KEY: chain, joint.LAYOUT_KEY: joint.LayoutRecord(layout), "cond_or_uncond": [0], "block_type": "double",
               "block_index": 0, CONTEXT_TOKENS_KEY: TEXT_TOKENS, RUN_KEY: run}
    baseline = start_peak_tracking()
    cuda_inputs = torch.cuda.memory_allocated() / 2 ** 20 if device == "cuda" else 0.0
    start = time.perf_counter()
    joint.JointAttentionDispatcher()(sdpa_attention, q, k, v, HEADS, skip_reshape=True, transformer_options=options)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_since(baseline)
    connection.send((peak.rss_mib, None if peak.cuda_mib is None else peak.cuda_mib - cuda_inputs, seconds))


def measure(processor_set: str, one_chunk: bool, device: str, threads: int):
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=one_call, args=(processor_set, one_chunk, device, threads, sender))
    child.start()
    result = receiver.recv()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    image_tokens = IMAGE_GRID[0] * IMAGE_GRID[1]
    logits_mib = HEADS * image_tokens * (TEXT_TOKENS + image_tokens) * 4 / 2 ** 20
    print(f"one joint call, batch 1: {HEADS} heads x {HEAD_DIM}, {image_tokens} image + {TEXT_TOKENS} text tokens; "
          f"all float32 logits of the cross view: {logits_mib:.0f} MiB; device {args.device}")
    print(f"{'processors':<30} {'chunks':<10} {'peak MiB':>9} {'CUDA MiB':>9} {'seconds':>8}")
    for processor_set in PROCESSOR_SETS:
        for one_chunk in (True, False):
            rss, cuda, seconds = measure(processor_set, one_chunk, args.device, args.threads)
            cuda_text = f"{cuda:9.0f}" if cuda is not None else f"{'-':>9}"
            print(f"{processor_set:<30} {'one' if one_chunk else 'budget':<10} {rss:9.0f} {cuda_text} {seconds:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()

"""PVA adapter sizes at real scale, from the real layer shapes (the models are built by ComfyUI's own classes on
the meta device: no weights are read or allocated). Prints, for FLUX.1 dev, SD3.5 Large, SDXL and SD1.5/SD2, the
parameters, the file size (fp32) and the fp32 AdamW memory of the current full-rank layout (pva-v1: a full copy of
each block's query/key/value projections, token transformer at the tokens' width) against the defaults of a fresh
PVATrainer (rank 16 on every block, token transformer per nodes.pva_training.token_width) and a few alternatives.

Adam: 8 bytes per parameter of optimizer state (two fp32 moments); training holds 16 (plus weight and gradient).

RealCustom section: the image branch (visual keys/values of every cross-attention block, from the text context's
width) and the CLIP-vision projector (SigLIP-so400m's 1152 channels to that width) of RealCustomTrainer: the
per-block layout on every block (every file before the layouts; the released SDXL model's) against the shared +
low-rank layout at rank 16 (the trainer's default on the DiTs and SDXL) and the block selections; the adaptive
scoring module (two small score nets, optional) is not counted.

Usage: .venv/bin/python bench/adapter_sizes.py
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
SD35_LARGE = dict(in_channels=16, out_channels=16, patch_size=2, depth=38, input_size=None, adm_in_channels=2048,
                  context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
                  num_patches=36864, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None)
UNETS = {
    "SDXL": dict(adm_in_channels=2816, num_classes="sequential", context_dim=2048, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], num_head_channels=64, use_linear_in_transformer=True),
    "SD1.5": dict(context_dim=768, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 2, 4, 4],
                  num_res_blocks=[2, 2, 2, 2], num_heads=8, use_linear_in_transformer=False),
    "SD2": dict(context_dim=1024, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 2, 4, 4],
                num_res_blocks=[2, 2, 2, 2], num_head_channels=64, use_linear_in_transformer=True),
}
UNET_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                   legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
ARCFACE_FEATURES = 512
MB = 1e6


def real_models():
    """name -> (diffusion model on the meta device)."""
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        models = {"FLUX.1 dev": comfy.ldm.flux.model.Flux(operations=ops, device="meta", **FLUX_DEV),
                  "SD3.5 Large": comfy.ldm.modules.diffusionmodules.mmdit.MMDiT(operations=ops, device="meta", **SD35_LARGE)}
        for name, config in UNETS.items():
            models[name] = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
                operations=ops, device="meta", **UNET_COMMON, **config)
    return models


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def adapter_parameters(net, rank: int, selection: str, inner_width) -> tuple[int, int]:
    """(parallel projections, token transformer) parameters of a fresh PVA on ``net``."""
    from harness.comfy_env import pack_module
    blocks_module, pva_nodes = (pack_module(m) for m in ("attention.blocks", "nodes.pva"))
    identity = pack_module("attention.pva_identity")
    model = SimpleNamespace(get_model_object=lambda name: net)
    found = [b for b in blocks_module.discover_transformer_blocks(list(net.named_modules())) if b.has_cross_attention]
    keys = set(blocks_module.selected_blocks(selection, [b.key for b in found]))
    blocks = [b for b in found if b.key in keys]
    projections = 0
    for block in blocks:
        layers = pva_nodes.own_layers(model, block)
        for layer, rows in layers:
            out = len(range(layer.out_features)[rows])
            projections += rank * (layer.in_features + out) if rank else out * (layer.in_features + (layer.bias is not None))
        if block.projections is not None:  # the per-head norm copies
            norms = [net.get_submodule(p) for p in (block.projections.query_norm, block.projections.key_norm)]
            projections += sum(count(n) for n in norms)
    width = pva_nodes.context_width(model, blocks[0])
    with torch.device("meta"):
        transformer = identity.IdentityTokenTransformer(ARCFACE_FEATURES, inner_width(width), output_width=width)
    return projections, count(transformer)


def main() -> None:
    from harness.comfy_env import boot_comfy, pack_module
    boot_comfy()
    token_width = pack_module("nodes.pva_training").token_width
    layouts = [("full rank, all blocks (pva-v1)", 0, "all", lambda width: width),
               ("rank 16, all, default tokens (default)", 16, "all", token_width),
               ("rank 8, all, default tokens", 8, "all", token_width),
               ("rank 16, double, default tokens", 16, "double", token_width),
               ("rank 16, every_2, default tokens", 16, "every_2", token_width),
               ("rank 16, all, tokens 768 wide", 16, "all", lambda width: min(width, 768))]
    print(f"{'model':12} {'layout':42} {'projections':>12} {'tokens':>11} {'total':>12} {'file MB':>9} "
          f"{'Adam MB':>9} {'train MB':>9}")
    models = real_models()
    for name, net in models.items():
        for label, rank, selection, width in layouts:
            try:
                projections, tokens = adapter_parameters(net, rank, selection, width)
            except ValueError:
                continue  # e.g. 'double' on a U-Net
            total = projections + tokens
            print(f"{name:12} {label:42} {projections:12,} {tokens:11,} {total:12,} {4 * total / MB:9.1f} "
                  f"{8 * total / MB:9.1f} {16 * total / MB:9.1f}")
        print()
    print_realcustom(models)


#: the width of each model's text context, which RealCustom's image tokens take (DiTs: before the context embedder)
TEXT_CONTEXT = {"FLUX.1 dev": FLUX_DEV["context_in_dim"],
                "SD3.5 Large": SD35_LARGE["context_embedder_config"]["params"]["in_features"],
                **{name: config["context_dim"] for name, config in UNETS.items()}}
SIGLIP_CHANNELS = 1152


def realcustom_shapes(net, token_width: int, selection: str):
    """``(family, {block: (attention width, token width)})`` of a RealCustomTrainer branch on ``net``."""
    from harness.comfy_env import pack_module
    blocks = [b for b in pack_module("attention.blocks").discover_transformer_blocks(list(net.named_modules()))
              if b.has_cross_attention]
    keys = set(pack_module("attention.blocks").selected_blocks(selection, [b.key for b in blocks]))
    return blocks[0].family, {b.key: (b.channels, token_width) for b in blocks if b.key in keys}


def realcustom_parameters(net, token_width: int, layout: str, rank: int, selection: str) -> int:
    from harness.comfy_env import pack_module
    weights = pack_module("attention.realcustom_weights")
    _, shapes = realcustom_shapes(net, token_width, selection)
    with torch.device("meta"):
        adapter = [weights.new_branch(shapes, layout, rank), weights.LinearProjector(SIGLIP_CHANNELS, token_width)]
    return sum(count(module) for module in adapter)


def print_realcustom(models) -> None:
    from harness.comfy_env import pack_module
    realcustom, weights = pack_module("attention.realcustom"), pack_module("attention.realcustom_weights")
    per_block, shared = realcustom.PER_BLOCK, realcustom.SHARED_LOW_RANK
    layouts = [("per-block, all blocks (before)", per_block, "all"), ("shared + rank 16, all", shared, "all"),
               ("shared + rank 16, double", shared, "double"), ("shared + rank 16, every_2", shared, "every_2"),
               ("shared + rank 16, every_4", shared, "every_4"), ("per-block, double", per_block, "double"),
               ("per-block, every_4", per_block, "every_4")]
    print(f"RealCustom image branch + projector\n{'model':12} {'layout':42} {'parameters':>12} {'file MB':>9} "
          f"{'Adam MB':>9} {'train MB':>9}")
    for name, net in models.items():
        family, shapes = realcustom_shapes(net, TEXT_CONTEXT[name], "all")
        default = weights.default_layout(family, shapes)
        for label, layout, selection in layouts:
            try:
                total = realcustom_parameters(net, TEXT_CONTEXT[name], layout, weights.DEFAULT_RANK, selection)
            except ValueError:
                continue  # 'double' on a U-Net
            mark = " (default)" if layout == default and selection == "all" else ""
            print(f"{name:12} {label + mark:42} {total:12,} {4 * total / MB:9.1f} {8 * total / MB:9.1f} "
                  f"{16 * total / MB:9.1f}")
        print()


if __name__ == "__main__":
    main()

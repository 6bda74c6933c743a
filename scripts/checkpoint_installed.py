"""Exit status 0 when ComfyUI would offer at least one checkpoint, 1 when it would offer none.

scripts/start_comfyui.sh asks this before generating the tiny demo models. It asks ComfyUI's own
folder_paths, configured from the arguments main.py will get (--base-directory,
--extra-model-paths-config) and from <ComfyUI>/extra_model_paths.yaml as main.py does, so every file
ComfyUI's checkpoint loader lists counts: any extension it loads (.safetensors, .ckpt, .pt, ...), in
sub-folders, in extra model paths.

Usage: python scripts/checkpoint_installed.py <ComfyUI folder> [main.py arguments]
"""
from __future__ import annotations

import itertools
import os
import sys


def checkpoint_names(comfy_dir: str, main_args: list[str]) -> list[str]:
    sys.path.insert(0, comfy_dir)
    sys.argv = ["main.py", *main_args]
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths
    import utils.extra_config
    from comfy.cli_args import args

    default_config = os.path.join(comfy_dir, "extra_model_paths.yaml")
    configs = [default_config] if os.path.isfile(default_config) else []
    for config in itertools.chain(configs, *(args.extra_model_paths_config or [])):
        utils.extra_config.load_extra_path_config(config)
    return folder_paths.get_filename_list("checkpoints")


if __name__ == "__main__":
    sys.exit(0 if checkpoint_names(os.path.abspath(sys.argv[1]), sys.argv[2:]) else 1)

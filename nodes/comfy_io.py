"""The one place the pack imports ComfyUI's node API.

The numbered ``comfy_api.v0_0_2`` is the stable surface (DESIGN.md §2); it re-exports everything the
pack uses (io, ComfyExtension), so no fallback to ``comfy_api.latest`` is needed yet.
"""
from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401

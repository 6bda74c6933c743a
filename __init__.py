"""Personalization node pack for ComfyUI: StyleAligned, RealCustom, PVA, DisenDiff and DETEX as graph nodes.

ComfyUI calls :func:`comfy_entrypoint`; nothing heavy happens at import time.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PersonalizationExtension

    return PersonalizationExtension()

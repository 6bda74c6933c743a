"""The additive attn2 protocol of IPAdapter_plus, InstantID and PuLID (their ``Attn2Replace``), written here
for the tests of our dispatcher's support for it: a replace holding parallel ``callback`` / ``kwargs``
lists, extended through ``add(callback, **kwargs)``, computing the base attention plus every callback
whose ``sigma_end <= sigma <= sigma_start``."""
from __future__ import annotations

from typing import Callable


class AdditiveAttn2Replace:
    def __init__(self, attention: Callable, callback: Callable, **kwargs):
        """``attention(q, k, v, heads)`` is the base attention (the packs use ComfyUI's optimized_attention)."""
        self.attention = attention
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback: Callable, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = self.attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0])
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out

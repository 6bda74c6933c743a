"""Input checks shared by the pack's nodes: a bad input ends in a clear error that names the node and the
problem, before any slow work (encoding, training) starts.

- :func:`guard_nodes`: applied once to every node class the pack registers (nodes/__init__.py), so no node can
  miss it. Before the node runs, a FLOAT input that is NaN or ±inf is refused (JSON NaN passes ComfyUI's min/max
  check, every comparison with NaN being False). A ValueError/FileNotFoundError raised inside (by the node or by
  the helpers it calls: output names, checkpoints, token search) gets the node id in front of its message when
  the message does not already name it, and reaches ComfyUI as the builtin type (ComfyUI reports a class of this
  pack by its module path, which holds the install folder).
- :func:`require_images`: a non-empty batch of finite values (NaN/inf refused: a trainer would spend minutes
  on a loss of NaN, a sampler would spread NaN over every image).
- :func:`require_finite`: finite values only.
- :func:`read_safetensors`: a model file read as safetensors only (no pickle), with one message for truncated,
  renamed or pickled files and for weights that are integers or hold NaN/inf.
- :func:`checked_clip`: the CLIP a node tokenizes its prompts with: ``embedding:`` words ComfyUI would unpickle
  (any file but .safetensors), drop (vectors of another width than the text encoder's) or misread (integers,
  NaN) are refused by name. :func:`resolve_embedding`: the vectors an ``embedding:<name>`` gives a CLIP, the
  same checks, telling a missing file from a damaged one. :func:`require_vectors_fit`: vectors a node is about
  to save as an embedding fit the CLIP.
"""
from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import math
import numbers
import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .comfy_io import io

#: the id of the pack node running now. A node that another node calls (PVAIdentityTune runs
#: ParallelVisualAttention.execute) runs unguarded: its errors are named once, after the node the user placed.
_RUNNING_NODE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("personalization_node", default=None)


def guard_nodes(classes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """Wrap the ``execute`` of each class in place (see the module docstring); returns ``classes``.

    Named by the schema's node id: ComfyUI executes a copy of the class named ``<class>Clone``, and calls
    ``execute.__func__`` of the registered class on it, so ``execute`` stays a classmethod."""
    for cls in classes:
        schema = cls.GET_SCHEMA()
        execute = cls.execute.__func__
        if inspect.iscoroutinefunction(execute):
            raise TypeError(f"{schema.node_id}: guard_nodes wraps synchronous execute methods only")
        floats = {i.id: i for i in schema.inputs if isinstance(i, io.Float.Input)}
        cls.execute = classmethod(_guarded(execute, schema.node_id, floats))
    return classes


def _guarded(execute, node: str, floats: dict[str, io.Float.Input]):
    positional = list(inspect.signature(execute).parameters)[1:]  # after cls
    node_named = re.compile(rf"\b{re.escape(node)}\b")

    @functools.wraps(execute)
    def guarded(cls, *args, **kwargs):
        if _RUNNING_NODE.get() is not None:
            return execute(cls, *args, **kwargs)
        values = {**dict(zip(positional, args)), **kwargs}
        for name, spec in floats.items():
            _require_finite_number(node, name, spec, values.get(name))
        running = _RUNNING_NODE.set(node)
        try:
            return execute(cls, *args, **kwargs)
        except (ValueError, FileNotFoundError) as error:
            builtin = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
            message = str(error)
            if node_named.search(message) is None:
                message = f"{node}: {message}"
            elif type(error) is builtin:
                raise
            raise builtin(message) from error
        finally:
            _RUNNING_NODE.reset(running)
    return guarded


def _require_finite_number(node: str, name: str, spec: io.Float.Input, value) -> None:
    """A FLOAT input's value (a float from a widget, any real number from a link) must be finite."""
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else str(value)
        allowed = f" from {spec.min} to {spec.max}" if spec.min is not None and spec.max is not None else ""
        raise ValueError(f"{node}: input '{name}' is {shown}; set a finite number{allowed}.")


def require_finite(node: str, what: str, tensor: Optional[torch.Tensor]) -> None:
    """Refuse NaN/inf in ``tensor`` (None passes: optional inputs)."""
    if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{node}: NaN or infinite values in the {what} ({bad} of {tensor.numel()}); check the node "
                         "that made them (a diverged sampler or VAE, a mask operation dividing by zero?).")


def require_images(node: str, what: str, images: Optional[torch.Tensor], minimum: int = 1) -> None:
    """A batch of at least ``minimum`` images (or masks) with finite values."""
    count = 0 if images is None else images.shape[0]
    if count < minimum:
        raise ValueError(f"{node}: no {what}; connect at least {minimum} (got {count})." if count == 0 else
                         f"{node}: {minimum} or more {what} needed, got {count}.")
    require_finite(node, what, images)


def require_masks_for(node: str, masks: Optional[torch.Tensor], images: torch.Tensor) -> None:
    """One finite, non-empty mask ``[N, H, W]`` per image ``[N, H, W, C]`` (optional: None passes)."""
    if masks is None:
        return
    count, size = images.shape[0], tuple(images.shape[1:3])
    if masks.ndim != 3 or masks.shape[0] != count or tuple(masks.shape[1:]) != size:
        raise ValueError(f"{node}: {masks.shape[0]} masks of {tuple(masks.shape[1:])} for {count} images of {size}; "
                         "give one mask per image, of the image's size.")
    require_finite(node, "masks", masks)
    empty = [i for i in range(count) if not bool((masks[i] > 0.5).any())]
    if empty:
        raise ValueError(f"{node}: the mask of image(s) {empty} (0-based) is empty; every mask must mark the region "
                         "(white = 1).")


#: the integer tensors a weights file may hold: BatchNorm's step counters (int64 in every PyTorch state dict with a
#: BatchNorm, e.g. the ArcFace backbone converted from its .pth), which inference never reads
_INTEGER_COUNTERS = ("num_batches_tracked",)


def read_safetensors(node: str, path: str | Path, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; clear errors for other formats, damaged files and NaN/inf."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{node}: {path.name} is not a .safetensors {what}; only .safetensors files are read (pickled "
                         ".pt/.pth/.ckpt files can run code). Convert it once to safetensors.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for bad headers
        raise ValueError(f"{node}: {path.name} is not a readable safetensors {what} (truncated download, or another "
                         f"format renamed to .safetensors): {error}") from error
    integer = sorted(k for k, t in tensors.items()
                     if not t.is_floating_point() and k.rpartition(".")[2] not in _INTEGER_COUNTERS)
    if integer:
        dtypes = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in integer})
        raise ValueError(f"{node}: {path.name} holds {'/'.join(dtypes)} weights (in {_some(integer)}); only "
                         f"floating-point {what}s are read (a quantized file needs its own loader): use the "
                         "float16/bfloat16/float32 file.")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"{node}: {path.name} holds NaN or infinite values (in {_some(bad)}); the file is damaged "
                         "or comes from a diverged training.")
    return tensors, metadata


def _some(keys: list[str]) -> str:
    return f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"


#: the suffixes ComfyUI's tokenizer tries after ``embedding:<name>`` in each embeddings folder (sd1_clip.load_embed)
_EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def embedding_file(tokenizer, name: str) -> Optional[Path]:
    """The file ComfyUI's ``load_embed`` reads for ``embedding:<name>`` with this sub-tokenizer: its embeddings
    folders and their subfolders, in ComfyUI's order, the same containment check and suffixes (None: no file)."""
    import comfy.sd1_clip

    folders = tokenizer.embedding_directory
    if folders is None:
        return None
    for folder in comfy.sd1_clip.expand_directory_list([folders] if isinstance(folders, str) else folders):
        folder = os.path.abspath(folder)
        base = os.path.abspath(os.path.join(folder, name))
        try:
            if os.path.commonpath((folder, base)) != folder:
                continue
        except ValueError:  # another drive (Windows): ComfyUI skips it too
            continue
        found = next((base + suffix for suffix in _EMBEDDING_SUFFIXES if os.path.isfile(base + suffix)), None)
        if found is not None:
            return Path(found)
    return None


def _refuse_pickled_embedding(who: str, tokenizer, word: str) -> None:
    """Before ComfyUI's loader reads ``embedding:<word>``: refuse the files it would unpickle (every one that is
    not .safetensors; a pickle ends in a bare UnboundLocalError there when torch's weights-only load refuses it)."""
    name = (word.split() or [word])[0]
    for candidate in dict.fromkeys((name, name.strip(","))):  # ComfyUI tries the name, then without its commas
        path = embedding_file(tokenizer, candidate)
        if path is not None and not path.name.lower().endswith(".safetensors"):
            raise ValueError(f"{who}embedding:{candidate} is {path}, not a .safetensors file; only .safetensors "
                             "embeddings are read (pickled .pt/.bin files can run code). Convert it once to "
                             "safetensors, or remove it.")


def _require_vectors(who: str, tokenizer, name: str, vectors: torch.Tensor) -> None:
    """Vectors ComfyUI encodes as they are: floating point, as wide as this text encoder's tokens, finite."""
    key, width = tokenizer.embedding_key, tokenizer.embedding_size
    if not vectors.is_floating_point():
        problem = (f"holds {str(vectors.dtype).removeprefix('torch.')} values; embeddings are floating-point vectors "
                   "(the file is damaged or quantized)")
    elif vectors.ndim == 0 or vectors.shape[-1] != width:
        problem = (f"gives {vectors.shape[-1] if vectors.ndim else 0}-wide vectors to this CLIP's {key} text encoder, "
                   f"whose tokens are {width} wide: the embedding was made for another model (ComfyUI would silently "
                   "leave it out of the prompt)")
    elif not bool(torch.isfinite(vectors).all()):
        problem = "holds NaN or infinite values; the file is damaged or comes from a diverged training"
    else:
        return
    path = embedding_file(tokenizer, name)
    raise ValueError(f"{who}embedding:{name} ({path if path is not None else 'vectors this CLIP carries'}) {problem}.")


def _checked_lookup(who: str, tokenizer, lookup):
    """``lookup`` (a sub-tokenizer's ``_try_get_embedding``) refusing pickled files before it reads them and vectors
    ComfyUI would misread after."""
    def try_get_embedding(word: str):
        _refuse_pickled_embedding(who, tokenizer, word)
        vectors, leftover = lookup(word)
        if vectors is not None:
            _require_vectors(who, tokenizer, word.split()[0].strip(","), vectors)
        return vectors, leftover
    return try_get_embedding


def checked_clip(node: str, clip):
    """A copy of ``clip`` to tokenize the prompts ``node`` reads: every ``embedding:`` word is refused, with an error
    naming ``node``, the file and the problem, where ComfyUI would unpickle it (not .safetensors), or leave it out of
    the prompt (vectors of another width than the text encoder's) or misread it (integers, NaN). Its tokens are
    exactly ``clip``'s. Keep it inside the node: other nodes get ``clip``."""
    from .training_glue import patched_tokenizer

    if clip is None or getattr(clip, "embeddings_checked_for", None) is not None:
        return clip

    def check(sub, original):
        sub._try_get_embedding = _checked_lookup(f"{node}: " if node else "", original, original._try_get_embedding)
        return sub

    checked = copy.copy(clip)  # a shallow copy (clone() needs a model: tokenizer-only CLIPs have none)
    checked.tokenizer = patched_tokenizer(clip.tokenizer, check)
    checked.embeddings_checked_for = node
    return checked


def resolve_embedding(node: str, clip, name: str, missing_hint: str = "") -> torch.Tensor:
    """The vectors ``embedding:<name>`` gives the CLIP's first text encoder, as its tokenizer resolves them
    (the embeddings folders, or vectors a trainer's CLIP carries), checked for every text encoder as
    :func:`checked_clip` checks prompt words."""
    from .training_glue import sub_tokenizers

    first = None
    for _, tokenizer in sub_tokenizers(checked_clip(node, clip).tokenizer):
        found = None if tokenizer.embedding_directory is None else tokenizer._try_get_embedding(name)[0]
        if found is None:
            existing = embedding_file(tokenizer, name)
            if existing is not None:
                raise ValueError(f"{node}: embedding:{name} ({existing}) could not be read: the file is damaged, "
                                 "truncated or not an embedding file.")
            raise FileNotFoundError(f"{node}: embedding:{name} was not found in models/embeddings{missing_hint}.")
        first = found if first is None else first
    return first


def require_vectors_fit(node: str, clip, vectors: dict[str, torch.Tensor], what: str) -> None:
    """``vectors`` (``{"clip_l": [N, 768], ...}``, an embedding file's layout, about to be saved) are as wide as the
    tokens of every text encoder of ``clip`` that reads them (its own key, else the first, as ComfyUI does): else
    ComfyUI would drop the word from prompts."""
    from .training_glue import sub_tokenizers

    for _, tokenizer in sub_tokenizers(clip.tokenizer):
        key, width = tokenizer.embedding_key, tokenizer.embedding_size
        given = vectors.get(key, next(iter(vectors.values())))  # ComfyUI reads a missing key's slot from the first
        if given.shape[-1] != width:
            raise ValueError(f"{node}: {what} are {given.shape[-1]}-wide {' + '.join(vectors)} vectors, but this "
                             f"CLIP's {key} text encoder reads {width}-wide ones: connect the CLIP of the model they "
                             "were made for.")


def require_matching_clip(node: str, model, clip) -> None:
    """The CLIP must give the text width the MODEL's cross-attention reads (one checkpoint's pair): SD1.x 768
    (CLIP-L), SD2 1024 (CLIP-H), SDXL 2048 (CLIP-L + CLIP-G)."""
    from .training_glue import sub_tokenizers

    context_dim = model.model.model_config.unet_config.get("context_dim")
    encoders = {name: sub.embedding_size for name, sub in sub_tokenizers(clip.tokenizer)}
    if context_dim is not None and encoders and sum(encoders.values()) != context_dim:
        raise ValueError(f"{node}: this MODEL ({type(model.model).__name__}) reads {context_dim}-wide text, but the "
                         f"CLIP gives {sum(encoders.values())} ({' + '.join(f'{k} {v}' for k, v in encoders.items())}); "
                         "connect the MODEL and CLIP of the same checkpoint.")

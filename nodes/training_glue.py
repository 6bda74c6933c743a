"""ComfyUI side of in-graph training, shared by every trainer node (DESIGN.md §4).

The pure-torch loop lives in ``training/``; this module adapts ComfyUI objects to it, the way
``comfy_extras/nodes_train.py`` does:

- :func:`training_mode`: ComfyUI runs prompts under ``torch.inference_mode()``; training needs it off
  and gradients on. :func:`clone_tensors` turns incoming inference tensors into normal ones.
- :func:`trainable_unet`: a clone whose weights are cast (copied) per forward, so autograd can save
  them, with :class:`WeightDelta` wrappers adding the trained changes to chosen weights.
- :func:`with_weight_deltas`: the trained changes baked as ``("diff", ...)`` patches, exactly what
  stock LoraLoaderModelOnly makes of an exported ``.diff`` file.
- :func:`denoise`, :func:`prediction_kind`, :func:`discrete_sigmas`: one U-Net call and the schedule;
  :func:`conditioning_extras`: the extra model inputs (SDXL's ADM vector, the pooled vector, guidance).
- :class:`PlaceholderPrompt` + :class:`TrainableTextEncoder`: prompts holding ``embedding:<name>``
  for vectors under training, encoded with gradients to the vectors; :func:`clip_with_embeddings`
  gives a CLIP that resolves those names to the trained vectors (no file needed).
- :func:`progress_reporter`, :data:`check_interrupted`: the loop's callbacks (the progress bar, and a line in
  the server console every few steps).
- :func:`run_checkpoints`, :func:`weights_sample`, :func:`exports_of_run`: where a run's checkpoints go, what
  tells one model's weights from another's in a run id, and keeping an earlier run's exported files
  (``training/runs.py`` has the rules).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import types
from pathlib import Path
from typing import Callable, Mapping, Optional

import comfy.clip_model
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sd1_clip
import comfy.text_encoders.t5
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter.base import WeightAdapterTrainBase

from ..attention.families import ADAPTERS
from ..training.checkpointing import CheckpointedForward
from ..training.losses import EPSILON, FLOW, V_PREDICTION
from ..training.naming import output_path
from ..training.runs import ExportedFile, RunCheckpoints, keep_earlier_exports
from .patching import RECOMPUTE_HOOKS_KEY, transformer_blocks, unpatched_modules
from .validation import checked_clip

log = logging.getLogger("personalization")
#: a console line at least every this many seconds of training (and at the start and the end)
CONSOLE_INTERVAL_S = 30.0

check_interrupted: Callable[[], None] = comfy.model_management.throw_exception_if_processing_interrupted


@contextlib.contextmanager
def training_mode():
    """Inference mode off, gradients on (ComfyUI executes every node under inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def clone_tensors(value):
    """Deep copy of nested dicts/lists/tuples with every tensor cloned (inference → normal tensors).
    Call inside :func:`training_mode`."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tensors(v) for v in value)
    return value


def progress_reporter(node: str, total: int) -> Callable[[int, int, Optional[float]], None]:
    """The loop's ``on_progress``: ComfyUI's progress bar (whose server hook raises on Cancel: the loop saves
    first), and a console line with the step, the loss and the seconds per step every tenth of the run or
    every :data:`CONSOLE_INTERVAL_S`, whichever comes first."""
    bar = comfy.utils.ProgressBar(total)
    every = max(1, total // 10)
    state = {"start": 0.0, "first": 0, "last_line": 0.0}

    def report(done: int, _total: int, loss: Optional[float]) -> None:
        now = time.monotonic()
        if loss is None:
            state.update(start=now, first=done, last_line=now)
            log.info("%s: %s", node, f"resuming at step {done} of {total}" if done else f"training {total} steps")
        elif done == total or done % every == 0 or now - state["last_line"] >= CONSOLE_INTERVAL_S:
            per_step = (now - state["start"]) / max(1, done - state["first"])
            log.info("%s: step %d/%d, loss %.5f, %.2f s/step", node, done, total, loss, per_step)
            state["last_line"] = now
        bar.update_absolute(done, total)
    return report


#: the one wording of every trainer's checkpoint_every input
CHECKPOINT_EVERY_TOOLTIP = ("Also save a resumable checkpoint every N steps. 0: only at the end and on Cancel (a "
                            "checkpoint is always kept; more steps later continue from it).")


def run_checkpoints(folder: str, name: str, run_id: str) -> RunCheckpoints:
    """The checkpoints of run ``run_id`` of output ``name``: ``output/<folder>/<name>/``."""
    return RunCheckpoints(output_path(Path(folder_paths.get_output_directory()) / folder, name, suffix=""), run_id)


def exports_of_run(node: str, name: str, files: list[ExportedFile], run_id: str) -> None:
    """Before a run writes its files: an earlier run's files of the same name move to a numbered name."""
    kept = keep_earlier_exports(name, files, run_id)
    if kept is not None:
        log.info("%s: the files of an earlier training run named %r are kept as %r", node, name, kept)


def weights_sample(module: torch.nn.Module, values: int = 256) -> torch.Tensor:
    """Evenly spaced values of every weight of ``module`` as loaded (LoRA patches merged), for a run id: two
    models of one architecture (another checkpoint, another LoRA on it) differ in them."""
    return torch.cat([w.detach().flatten()[::max(1, w.numel() // values)][:values].float().cpu()
                      for w in module.state_dict().values() if w.is_floating_point() and w.numel() > 0])


class WeightDelta(WeightAdapterTrainBase):
    """Trainable additive change of one weight, attached with ``ModelPatcher.add_weight_wrapper``."""

    def __init__(self, shape, device=None):
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))

    def __call__(self, weight):
        return weight + self.diff.to(weight.dtype)

    def passive_memory_usage(self):
        return self.diff.nelement() * self.diff.element_size()


def _copy_weight(weight):
    # A weight/bias function makes comfy.ops cast the tensor with copy=True, so the frozen layers hand
    # autograd normal tensors instead of the inference tensors (weights loaded while ComfyUI ran the
    # loader under inference_mode) that it cannot save for backward.
    return weight


def training_compute_dtype(model) -> torch.dtype:
    """The dtype a trainer's forward of MODEL computes in: the one ComfyUI loaded the model to compute in (its
    weights' dtype, or the dtype it casts fp8 weights to), where it trains without loss scaling (fp32, bf16); fp16
    and fp8 become bf16 where the device has it, fp32 where not. The trained parameters and their optimizer state
    stay fp32 whatever this is; on the CPU ComfyUI loads models in fp32."""
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    if dtype in (torch.float32, torch.bfloat16):
        return dtype
    return torch.bfloat16 if comfy.model_management.should_use_bf16(model.load_device) else torch.float32


def trainable_unet(model, deltas: Mapping[str, WeightDelta], checkpointing: bool = False):
    """A clone of MODEL computing in :func:`training_compute_dtype` with ``deltas``
    (``"diffusion_model.<path>.weight"`` keys) added to their weights, every other weight frozen, its blocks
    checkpointed when ``checkpointing`` (:func:`checkpointed_blocks`); loaded on the torch device."""
    patched = model.clone()
    if checkpointing:
        checkpointed_blocks(patched)
    patched.set_model_compute_dtype(training_compute_dtype(model))
    wrapped = set()
    for name, module in unpatched_modules(patched, root=""):
        if not hasattr(module, "comfy_cast_weights"):
            _copy_inference_parameters(patched, name, module)
            continue
        for param in ("weight", "bias"):  # norms save their bias for backward too
            if getattr(module, param, None) is not None:
                key = f"{name}.{param}"
                patched.add_weight_wrapper(key, deltas.get(key, _copy_weight))
                wrapped.add(key)
    missing = sorted(set(deltas) - wrapped)
    if missing:
        raise KeyError(f"the model has no trainable weight {missing[0]}")
    patched.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    return patched


#: diffusion-model parameters from which a trainer checkpoints its blocks by default: every model people train (SD1.5's
#: U-Net has 0.86 B; measured by bench/train_memory.py at 512 px in fp32, its trainers' steps take 5.5-6.2 GiB
#: checkpointed and more than 9.3 GiB without), not the tests' tiny models
CHECKPOINTING_PARAMETERS = 0.5e9
#: ... and the training resolution from which it does whatever the model's size
CHECKPOINTING_RESOLUTION = 768


def checkpoints_blocks(model, resolution: int, asked: Optional[bool] = None) -> bool:
    """Whether a trainer checkpoints the blocks of ``model`` (gradient checkpointing): as ``asked``, else for the
    large models and the high resolutions, where the activations of every block would not fit beside the model."""
    if asked is not None:
        return asked
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return parameters >= CHECKPOINTING_PARAMETERS or resolution >= CHECKPOINTING_RESOLUTION


def checkpointed_blocks(patched) -> list[CheckpointedForward]:
    """Object patches of the clone (restored when another clone loads, like all object patches) that run each of
    its family's checkpoint units with gradient checkpointing (training/checkpointing.py: the gradients are the
    plain run's to the bit, in a fraction of the activation memory, for one more forward pass per step)."""
    modules = unpatched_modules(patched)
    blocks = transformer_blocks(patched, families=ADAPTERS)
    by_path = dict(modules)
    forwards = []
    for path in blocks[0].family.checkpoint_units(modules, blocks):
        module = by_path[path]
        # the class's forward: an earlier clone's object patch may still be applied to the shared module
        forward = CheckpointedForward(types.MethodType(type(module).forward, module), _recompute_hooks)
        patched.add_object_patch(f"diffusion_model.{path}.forward", forward)
        forwards.append(forward)
    return forwards


def _recompute_hooks(args: tuple, kwargs: dict):
    """The per-call hooks a block's recomputation needs (nodes.patching.RECOMPUTE_HOOKS_KEY in the
    transformer_options it was called with), or none."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, dict) and RECOMPUTE_HOOKS_KEY in value:
            return value[RECOMPUTE_HOOKS_KEY]()
    return contextlib.nullcontext()


def _copy_inference_parameters(patched, name: str, module: torch.nn.Module) -> None:
    """Parameters outside ComfyUI's cast layers (the DiTs' per-head RMSNorm scales) reach autograd as they were
    loaded: inference tensors when a loader node ran under inference_mode, which autograd cannot save for
    backward. The clone gets normal copies as object patches (its own; the shared model keeps its tensors)."""
    for param_name, param in module.named_parameters(recurse=False):
        if param.is_inference():
            patched.add_object_patch(f"{name}.{param_name}", torch.nn.Parameter(param.detach().clone(),
                                                                                 requires_grad=False))


@contextlib.contextmanager
def saved_tensor_copies(enabled: bool = True):
    """Autograd keeps its own copies of the tensors it saves for backward (when ``enabled``). ComfyUI's Flux
    blocks add to their residual stream in place after normalising it (``x += ...``), and its T5 layers add their
    residuals in place, so a gradient that flows back through them (from a trained branch in an earlier block,
    to a learned token) would find a saved tensor changed and autograd would refuse; the copies cost one more
    copy of the saved activations."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
        yield


def with_weight_deltas(model, deltas: Mapping[str, torch.Tensor], strength: float = 1.0):
    """A clone with the changes as ``diff`` patches: what LoraLoaderModelOnly does with ``.diff`` keys."""
    patched = model.clone()
    patched.add_patches({k: ("diff", (d.detach().clone(),)) for k, d in deltas.items()}, strength)
    return patched


def prediction_kind(model, flow: bool = False) -> str:
    """``"eps"`` or ``"v"`` (and, for trainers that mix noise the flow way, ``"flow"``: rectified flow, ComfyUI's
    CONST) from the MODEL's sampling type; a clear error for anything else."""
    sampling = model.get_model_object("model_sampling")
    denoised_fn = type(sampling).calculate_denoised
    if denoised_fn is comfy.model_sampling.EPS.calculate_denoised:
        return EPSILON
    if denoised_fn is comfy.model_sampling.V_PREDICTION.calculate_denoised:
        return V_PREDICTION
    if flow and denoised_fn is comfy.model_sampling.CONST.calculate_denoised:
        return FLOW
    raise ValueError(f"training supports ε- and v-prediction{' and rectified-flow' if flow else ''} models; this "
                     f"MODEL samples with {type(sampling).__name__}")


def discrete_sigmas(model) -> torch.Tensor:
    """σ of each discrete training timestep (1000 for SD1.5/SDXL), for uniform t sampling."""
    sampling = model.get_model_object("model_sampling")
    if not hasattr(sampling, "sigmas"):
        raise ValueError(f"training needs a discrete-timestep model; {type(sampling).__name__} is continuous")
    return sampling.sigmas.detach().float().cpu().clone()


def denoise(patched, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """One U-Net call returning ComfyUI's denoised ``x̂0`` (all samples one cond chunk), with the
    clone's patches and attention processors in effect."""
    # Clones share the U-Net module: make sure this clone's weight wrappers are the ones patched in
    # (a no-op while it stays loaded).
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    options = dict(patched.model_options["transformer_options"])
    # the clone's wrappers, as ComfyUI's sampler hands them to the model (the DiTs' token layout is published by one)
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}), patched.wrappers)
    options["sigmas"] = sigma
    options["cond_or_uncond"] = [0]
    return patched.model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=options, **model_kwargs)


def conditioning_extras(model, family, pooled: Optional[torch.Tensor], size: int, x_t: torch.Tensor,
                        context: torch.Tensor) -> dict:
    """Model keyword arguments of a training call on ``x_t`` besides the token conditioning: the ADM vector ``y``
    ComfyUI's ``encode_adm`` builds from the pooled text output of a square ``size`` training image (SDXL's pooled
    CLIP-G + original/crop/target size, no crop; Flux's and SD3's the pooled vector itself; none without a pooled
    output), the guidance input the model's ``family`` trains with (its adapter's ``training_guidance``) and what
    else the family's model takes for a ``context`` of that many tokens (``training_inputs``: Z-Image's num_tokens)."""
    out = dict(family.training_inputs(context.shape[1]))
    if pooled is not None:
        adm = model.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                     target_width=size, target_height=size)
        if adm is not None:
            out["y"] = adm
    guidance = family.training_guidance(model.model.diffusion_model)
    if guidance is not None:
        out["guidance"] = torch.full((x_t.shape[0],), guidance, device=x_t.device)
    return out


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents of images ``(N, H, W, C)``, one per image. A video VAE (``latent_dim`` 3: the Wan 2.1 VAE of
    Qwen-Image) encodes an image batch as one video of N frames, so it gets the images one by one, each a one-frame
    video ``(1, C', 1, h, w)``, the latent its model samples (ComfyUI crops a video's frames to a multiple of 8
    too, so a batch of one-frame videos cannot be handed over whole)."""
    pixels = pixels[..., :3]
    with torch.no_grad():
        if getattr(vae, "latent_dim", 2) == 3:
            latents = torch.cat([vae.encode(image[None]) for image in pixels])
        else:
            latents = vae.encode(pixels)
    return latents.float().clone()


def sub_tokenizers(tokenizer):
    """(attribute, SDTokenizer) pairs of a CLIP tokenizer (``clip_l``; ``clip_l`` + ``clip_g`` for SDXL)."""
    return [(k, v) for k, v in vars(tokenizer).items() if isinstance(v, comfy.sd1_clip.SDTokenizer)]


def patched_tokenizer(tokenizer, patch):
    """A shallow copy of ``tokenizer`` whose sub-tokenizers are ``patch(copy, original)``: ``copy`` is a shallow
    copy of the sub-tokenizer ``original``, the caller's to change."""
    result = copy.copy(tokenizer)
    for attr, sub in sub_tokenizers(tokenizer):
        setattr(result, attr, patch(copy.copy(sub), sub))
    return result


def _tokenizer_with_lookup(tokenizer, lookup):
    """A shallow copy of ``tokenizer`` whose ``embedding:<name>`` resolution asks
    ``lookup(sub_tokenizer, name) -> tensor | None`` before the embeddings folder."""
    def patch(patched, sub):
        fallback = sub._try_get_embedding

        def try_get_embedding(embedding_name):
            name, _, leftover = embedding_name.strip().partition(" ")
            found = lookup(sub, name)
            return (found, leftover.strip()) if found is not None else fallback(embedding_name)

        patched._try_get_embedding = try_get_embedding
        if patched.embedding_directory is None:  # the tokenizer only resolves embeddings when it has one
            patched.embedding_directory = []
        return patched
    return patched_tokenizer(tokenizer, patch)


class PlaceholderPrompt:
    """Tokens of a prompt whose ``embedding:<name>`` words stand for vectors under training.

    Tokenization is ComfyUI's own, so positions and padding are exactly those a stock
    CLIPTextEncode gives the exported embedding files. ``substitute(vectors)`` puts the live tensors
    (``{name: {"clip_l": [rows, 768], ...}}``) into the token lists for a differentiable encode.
    """

    def __init__(self, clip, text: str, rows: Mapping[str, int]):
        self._slots: dict[int, tuple[str, str, int]] = {}
        self._markers = []  # keeps marker storage alive so data pointers stay unique
        self._hidden: list[torch.Tensor] = []  # the markers handed up as ids (_markers_as_ids)

        def lookup(sub, name):
            if name not in rows:
                return None
            marker = torch.zeros(rows[name], sub.embedding_size)
            self._markers.append(marker)
            for row in range(rows[name]):
                self._slots[marker[row].data_ptr()] = (name, sub.embedding_key, row)
            return marker

        # the prompt's other embedding: words are checked as node prompts are (the node guard adds the node's name)
        tokenizer = _tokenizer_with_lookup(checked_clip("", clip).tokenizer, lookup)
        self.tokens = self._markers_restored(patched_tokenizer(tokenizer, self._markers_as_ids).tokenize_with_weights(text))
        found = {name for name, _, _ in self._slots.values()}
        if found != set(rows):
            raise ValueError(f"the prompt {text!r} must contain " +
                             ", ".join(f"embedding:{n}" for n in sorted(set(rows) - found)))

    def _markers_as_ids(self, patched, _sub):
        """A sub-tokenizer handing each marker row up as an id below 0 (no vocabulary's): ComfyUI's Qwen-Image
        tokenizer compares every token its sub-tokenizer made with an id (its image pad's), which fails on a
        vector; :meth:`_markers_restored` puts them back once the whole tokenization is done."""
        tokenize = patched.tokenize_with_weights

        def as_id(token):
            if torch.is_tensor(token[0]) and token[0].data_ptr() in self._slots:
                self._hidden.append(token[0])
                return (-len(self._hidden),) + tuple(token[1:])
            return token

        def tokenize_with_ids(*args, **kwargs):
            return [[as_id(token) for token in chunk] for chunk in tokenize(*args, **kwargs)]
        patched.tokenize_with_weights = tokenize_with_ids
        return patched

    def _markers_restored(self, tokens: dict) -> dict:
        def restored(token):
            hidden = isinstance(token[0], int) and token[0] < 0
            return (self._hidden[-1 - token[0]],) + tuple(token[1:]) if hidden else token
        return {enc: [[restored(t) for t in chunk] for chunk in chunks] for enc, chunks in tokens.items()}

    def positions(self, encoder: str, name: str) -> list[int]:
        """Flat token positions (over 77-token chunks) of ``name``'s rows in one encoder's tokens."""
        flat = [t for chunk in self.tokens[encoder] for t in chunk]
        return [i for i, t in enumerate(flat) if torch.is_tensor(t[0]) and self._slots.get(t[0].data_ptr(), ("",))[0] == name]

    def substitute(self, vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
        def swap(token):
            slot = self._slots.get(token[0].data_ptr()) if torch.is_tensor(token[0]) else None
            if slot is None:
                return token
            name, key, row = slot
            return (vectors[name][key][row],) + tuple(token[1:])
        return {enc: [[swap(t) for t in chunk] for chunk in chunks] for enc, chunks in self.tokens.items()}


class TrainableTextEncoder:
    """A private copy of CLIP's text model with normal (non-inference) frozen weights, so gradients
    reach token vectors spliced into the prompt. Encodes like ``CLIP.encode_from_tokens``."""

    def __init__(self, clip):
        clip.load_model()
        self.model = copy.deepcopy(clip.cond_stage_model)  # deepcopy clones: call in training_mode()
        self.model.requires_grad_(False)
        for layer in self.model.modules():
            if isinstance(layer, comfy.clip_model.CLIPLayer):
                layer.forward = types.MethodType(_residual_layer_forward, layer)
        #: T5 (Flux's and SD3's text encoder) adds its residuals in place too, in layers too involved to rewrite
        self._adds_in_place = any(isinstance(layer, comfy.text_encoders.t5.T5) for layer in self.model.modules())
        self.layer_idx = clip.layer_idx

    def encode(self, tokens: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        self.model.reset_clip_options()
        if self.layer_idx is not None:
            self.model.set_clip_options({"layer": self.layer_idx})
        with saved_tensor_copies(self._adds_in_place):
            cond, pooled = self.model.encode_token_weights(tokens)[:2]
        return cond, pooled


def _residual_layer_forward(self, x, mask=None, optimized_attention=None):
    # comfy.clip_model.CLIPLayer adds its residuals in place, which autograd rejects (the layer norms
    # saved x); same computation, out of place, on our private copy only.
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def clip_with_embeddings(clip, vectors: Mapping[str, Mapping[str, torch.Tensor]]):
    """A CLIP clone that resolves ``embedding:<name>`` to the given vectors (``{name: {"clip_l": ...}}``)
    before the embeddings folder, like the exported files would."""
    frozen = {name: {k: v.detach().float().cpu().clone() for k, v in per_key.items()} for name, per_key in vectors.items()}

    def lookup(sub, name):
        return frozen.get(name, {}).get(sub.embedding_key)

    patched = clip.clone()
    patched.tokenizer = _tokenizer_with_lookup(clip.tokenizer, lookup)
    return patched

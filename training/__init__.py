"""Pure-torch training core shared by every trainer of the pack (DESIGN.md §4), plus one module per
technique. Never imports ComfyUI: the node glue (``nodes/training_glue.py``) passes ComfyUI objects in
as plain callables.

Core API
--------
``loop.train(params, step_fn, make_optimizer, LoopSettings(...), on_progress, check_interrupted)``
    Plain loop over optimizer steps with gradient accumulation. ``params`` is ``{name: leaf tensor}``;
    ``step_fn(MicroStep) -> scalar loss`` computes one micro-batch and must take all its randomness from
    ``MicroStep.generator`` (seeded from ``(seed, step, micro)``), which makes interrupt + resume give
    the same weights as an uninterrupted run. ``LoopSettings`` holds steps, grad_accumulation, seed,
    checkpoint_every, checkpoint_path and a run ``fingerprint`` (``loop.fingerprint(**settings)``);
    a checkpoint at that path is resumed, or refused when its fingerprint differs. Returns a
    ``TrainingResult`` (steps, resumed_from, per-step losses).
``checkpoint``
    ``save_atomic(path, tensors, metadata)`` (safetensors via temp file + rename);
    ``save_checkpoint`` / ``load_checkpoint`` of ``TrainingState`` (params, optimizer state, step).
``losses``
    ``sample_timesteps`` (uniform discrete t), ``add_noise`` (``x0 + σ·ε``), ``prediction_from_denoised``
    (ε̂ or v̂ from ComfyUI's denoised output), ``masked_mse``, ``diffusion_loss(kind, x_t, denoised, x0,
    σ, mask)``: the papers' ε/v-MSE, not TrainLoraNode's x0 loss. ``kind`` is ``"eps"`` or ``"v"``.
``naming``
    ``checked_name(name)`` (refuses any name but letters/digits of any script, ``-_.``), ``output_path(folder, name,
    suffix)``: never leaves ``folder``.
``exporters``
    ``save_embedding(path, clip_l, clip_g=None)``: ``{"clip_l": [N,768]}`` (+ ``clip_g``) for
    ``models/embeddings`` (``embedding:name`` in stock CLIPTextEncode);
    ``save_lora(path, {"diffusion_model.<path>.weight": delta}, rank=0)``: ``.diff`` keys (rank 0) or an
    SVD LoRA, for stock LoraLoaderModelOnly.
"""

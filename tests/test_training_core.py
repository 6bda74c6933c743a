"""Unit tests of the shared training core (training/): loop, checkpoints, losses, naming, exporters."""
from __future__ import annotations

import math
import os
import re
import stat

import pytest
import torch
from safetensors.torch import load_file

from personalization_nodes.training import exporters, losses, naming
from personalization_nodes.training.checkpoint import CheckpointMismatchError, save_atomic
from personalization_nodes.training.loop import LoopSettings, fingerprint, train
from personalization_nodes.training.runs import (RUN_ID_KEY, ExportedFile, RunCheckpoints, keep_earlier_exports,
                                                  run_of)


def _toy_problem():
    """A small regression whose step function draws all randomness from the micro-step generator."""
    target = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))

    def make_params():
        return {"weight": torch.zeros(6, 3, requires_grad=True), "bias": torch.zeros(3, requires_grad=True)}

    def step_fn_for(params):
        def step_fn(micro):
            x = torch.randn(4, 6, generator=micro.generator)
            return ((x @ params["weight"] + params["bias"] - x @ target) ** 2).mean()
        return step_fn

    def adamw(tensors):
        return torch.optim.AdamW(tensors, lr=0.05, weight_decay=0.01)

    return make_params, step_fn_for, adamw


class Interrupt(Exception):
    pass


def _checkpoints(tmp_path, run_id="toy"):
    return RunCheckpoints(tmp_path / "checkpoints", run_id)


def _straight(steps, **settings):
    """Weights and losses of an uninterrupted run without checkpoints."""
    make_params, step_fn_for, adamw = _toy_problem()
    params = make_params()
    result = train(params, step_fn_for(params), adamw, LoopSettings(steps=steps, **settings))
    return params, result


def _run(steps, checkpoints, on_progress=None, check_interrupted=None, **settings):
    make_params, step_fn_for, adamw = _toy_problem()
    params = make_params()
    result = train(params, step_fn_for(params), adamw, LoopSettings(steps=steps, checkpoints=checkpoints, **settings),
                   on_progress=on_progress, check_interrupted=check_interrupted)
    return params, result


def _same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


def test_interrupt_and_resume_equals_uninterrupted_run(tmp_path):
    straight, reference = _straight(9, grad_accumulation=2, seed=3)
    calls = []

    def interrupt_at_sixth_step():
        calls.append(1)
        if len(calls) == 6 * 2 + 1:  # first micro-batch of step index 6
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(9, _checkpoints(tmp_path), check_interrupted=interrupt_at_sixth_step, grad_accumulation=2, seed=3,
             checkpoint_every=4)
    assert not list(tmp_path.glob("**/.*.tmp")), "temp files must not survive"
    progress = []
    resumed, result = _run(9, _checkpoints(tmp_path), on_progress=lambda done, total, loss: progress.append((done, total)),
                           grad_accumulation=2, seed=3, checkpoint_every=4)
    assert result.resumed_from == 6
    assert progress[0] == (6, 9) and progress[-1] == (9, 9)
    assert _same(resumed, straight)
    assert result.losses == pytest.approx(reference.losses, abs=0, rel=1e-12)
    assert reference.losses[-1] < reference.losses[0]


class ServerCancel(Exception):
    """What ComfyUI's server progress hook raises on Cancel (comfy.model_management.InterruptProcessingException)."""


@pytest.mark.parametrize("checkpoint_every", [0, 10])
def test_a_cancel_raised_by_the_progress_hook_keeps_the_last_finished_step(tmp_path, checkpoint_every):
    """ComfyUI's server raises on Cancel inside the progress bar's hook, i.e. from ``on_progress`` after a step,
    not from ``check_interrupted``: that step must be kept, whatever checkpoint_every is (0: only at the end)."""
    straight, _ = _straight(30)

    def cancel_after_step_13(done, total, loss):
        if done == 13:
            raise ServerCancel

    with pytest.raises(ServerCancel):
        _run(30, _checkpoints(tmp_path), on_progress=cancel_after_step_13, checkpoint_every=checkpoint_every)
    resumed, result = _run(30, _checkpoints(tmp_path), checkpoint_every=checkpoint_every)
    assert result.resumed_from == 13
    assert _same(resumed, straight)


def test_an_error_inside_a_step_keeps_the_finished_steps(tmp_path):
    make_params, step_fn_for, adamw = _toy_problem()
    params = make_params()
    inner = step_fn_for(params)

    def fails_at_step_4(micro):
        if micro.step == 4:
            raise KeyboardInterrupt
        return inner(micro)

    with pytest.raises(KeyboardInterrupt):
        train(params, fails_at_step_4, adamw, LoopSettings(steps=8, checkpoints=_checkpoints(tmp_path)))
    _, result = _run(8, _checkpoints(tmp_path))
    assert result.resumed_from == 4


def test_a_diverged_state_is_not_checkpointed(tmp_path):
    def step_fn(micro):
        return (w * torch.inf).sum() if micro.step == 2 else (w ** 2).sum()

    w = torch.ones(3, requires_grad=True)
    with pytest.raises(FloatingPointError):
        train({"w": w}, step_fn, lambda t: torch.optim.SGD(t, lr=0.1), LoopSettings(steps=5, checkpoints=_checkpoints(tmp_path)))
    assert _checkpoints(tmp_path).resume_point(5).name.endswith("step-2.safetensors"), "the finite state before it"


def test_finished_run_is_not_trained_again(tmp_path):
    done, _ = _run(3, _checkpoints(tmp_path))
    again, result = _run(3, _checkpoints(tmp_path))
    assert result.resumed_from == 3 and len(result.losses) == 3
    assert _same(again, done)


def test_more_steps_continue_the_run_and_fewer_steps_replay_it(tmp_path):
    """The edit-and-run loop: 8 steps, then 12 (continues from 8), then 8 again (replayed from scratch, the 12-step
    checkpoint kept), then 12 again (found finished): every result equals the straight run of that length."""
    eight, twelve = _straight(8)[0], _straight(12)[0]
    assert _same(_run(8, _checkpoints(tmp_path))[0], eight)
    params, result = _run(12, _checkpoints(tmp_path))
    assert result.resumed_from == 8 and _same(params, twelve)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["run-toy.step-12.safetensors"]
    params, result = _run(8, _checkpoints(tmp_path))
    assert result.resumed_from == 0 and _same(params, eight)
    params, result = _run(12, _checkpoints(tmp_path))
    assert result.resumed_from == 12 and _same(params, twelve)
    params, result = _run(10, _checkpoints(tmp_path))
    assert result.resumed_from == 8 and _same(params, _straight(10)[0])


def test_each_run_has_its_own_checkpoints(tmp_path):
    _run(3, _checkpoints(tmp_path, "aaaa"))
    _, other = _run(2, _checkpoints(tmp_path, "bbbb"))
    assert other.resumed_from == 0
    _, first = _run(3, _checkpoints(tmp_path, "aaaa"))
    assert first.resumed_from == 3


def test_a_renamed_checkpoint_of_another_run_is_refused(tmp_path):
    _run(2, _checkpoints(tmp_path, "aaaa"))
    folder = tmp_path / "checkpoints"
    (folder / "run-aaaa.step-2.safetensors").rename(folder / "run-bbbb.step-2.safetensors")
    with pytest.raises(CheckpointMismatchError, match="different inputs"):
        _run(2, _checkpoints(tmp_path, "bbbb"))


# --- exported files of earlier runs ---------------------------------------------------------------

def _export(folder, name, run_id, suffixes=("_new1", "_kv")):
    for suffix in suffixes:
        save_atomic(folder / f"{name}{suffix}.safetensors", {"x": torch.zeros(1)}, {RUN_ID_KEY: run_id})


def _run_ids(folder):
    return {path.stem: run_of(path) for path in folder.iterdir()}


def test_another_runs_exports_are_kept_under_the_next_number(tmp_path):
    kinds = [ExportedFile(tmp_path, "_new{index}"), ExportedFile(tmp_path, "_kv")]
    _export(tmp_path, "pair", "A", ("_new1", "_new2", "_new3", "_kv"))
    assert keep_earlier_exports("pair", kinds, "A") is None, "a run updates its own files"
    assert keep_earlier_exports("pair", kinds, "B") == "pair_00001"
    assert _run_ids(tmp_path) == {"pair_00001_new1": "A", "pair_00001_new2": "A", "pair_00001_new3": "A",
                                  "pair_00001_kv": "A"}
    _export(tmp_path, "pair", "B", ("_new1", "_kv"))
    (tmp_path / "unrelated_new1.safetensors").write_bytes(b"not ours")
    assert keep_earlier_exports("pair", kinds, "C") == "pair_00002"
    assert _run_ids(tmp_path)["pair_00002_new1"] == "B" and "pair_new1" not in _run_ids(tmp_path)
    assert _run_ids(tmp_path)["unrelated_new1"] is None, "another name's files stay"


def test_files_of_no_run_are_kept_too(tmp_path):
    """A file under the name that records no run (an older version's, another tool's, damaged) is never
    overwritten."""
    (tmp_path / "subject_kv.safetensors").write_bytes(b"someone's file")
    assert keep_earlier_exports("subject", [ExportedFile(tmp_path, "_kv")], "A") == "subject_00001"
    assert (tmp_path / "subject_00001_kv.safetensors").read_bytes() == b"someone's file"


def test_fingerprint_refuses_values_without_a_stable_form():
    with pytest.raises(TypeError):
        fingerprint(model=object())


def test_gradient_accumulation_averages_micro_batches():
    """Two accumulated micro-batches of SGD give the step of the mean of their gradients."""
    w = torch.zeros(3, requires_grad=True)
    xs = []

    def step_fn(micro):
        x = torch.randn(3, generator=micro.generator)
        xs.append(x)
        return (w * x).sum()

    train({"w": w}, step_fn, lambda t: torch.optim.SGD(t, lr=1.0), LoopSettings(steps=1, grad_accumulation=2))
    assert torch.allclose(w, -(xs[0] + xs[1]) / 2)


def test_fingerprint_changes_with_settings_and_tensors():
    base = fingerprint(lr=1e-4, image=torch.ones(2))
    assert base == fingerprint(image=torch.ones(2), lr=1e-4)
    assert base != fingerprint(lr=2e-4, image=torch.ones(2))
    assert base != fingerprint(lr=1e-4, image=torch.zeros(2))


def test_rejects_non_trainable_tensors():
    with pytest.raises(ValueError, match="requires_grad"):
        train({"w": torch.zeros(2)}, lambda m: torch.zeros(()), torch.optim.SGD, LoopSettings(steps=1))


# --- losses ---------------------------------------------------------------------------------------

def _comfy_eps_denoised(x_t, eps_hat, sigma):
    return x_t - sigma.view(-1, 1, 1, 1) * eps_hat  # comfy.model_sampling.EPS.calculate_denoised


def _comfy_v_denoised(x_t, v_hat, sigma):
    s = sigma.view(-1, 1, 1, 1)  # comfy.model_sampling.V_PREDICTION.calculate_denoised, sigma_data 1
    return x_t / (s ** 2 + 1) - v_hat * s / (s ** 2 + 1).sqrt()


def test_eps_loss_is_ldm_noise_mse():
    gen = torch.Generator().manual_seed(0)
    x0, noise, eps_hat = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.5, 3.0])
    x_t = losses.add_noise(x0, noise, sigma)
    loss = losses.diffusion_loss("eps", x_t, _comfy_eps_denoised(x_t, eps_hat, sigma), x0, sigma)
    assert torch.allclose(loss, ((eps_hat - noise) ** 2).mean(), rtol=1e-5)


def test_v_loss_is_ldm_velocity_mse():
    gen = torch.Generator().manual_seed(1)
    x0, noise, v_hat = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.2, 5.0])
    x_t = losses.add_noise(x0, noise, sigma)
    s = sigma.view(-1, 1, 1, 1)
    alpha, sigma_t = 1 / (1 + s ** 2).sqrt(), s / (1 + s ** 2).sqrt()  # VP schedule of the same step
    v_target = alpha * noise - sigma_t * x0
    loss = losses.diffusion_loss("v", x_t, _comfy_v_denoised(x_t, v_hat, sigma), x0, sigma)
    assert torch.allclose(loss, ((v_hat - v_target) ** 2).mean(), rtol=1e-4)


def test_masked_mse_matches_per_sample_reference():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:4, 2:5] = 1
    mask[1] = 1
    expected = []
    for i in range(2):
        picked = [(a[i, c, y, x] - b[i, c, y, x]) ** 2 for c in range(4) for y in range(6) for x in range(6)
                  if mask[i, 0, y, x] > 0]
        expected.append(sum(picked) / len(picked))
    assert torch.allclose(losses.masked_mse(a, b, mask), sum(expected) / 2, rtol=1e-5)
    assert torch.allclose(losses.masked_mse(a, b), ((a - b) ** 2).mean())


def test_unknown_prediction_type_is_an_error():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="unsupported prediction"):
        losses.prediction_from_denoised("x0", x, x, torch.ones(1))


def test_timesteps_are_uniform_and_seeded():
    t = losses.sample_timesteps(20000, torch.Generator().manual_seed(0), 1000)
    assert t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 10
    assert torch.equal(t, losses.sample_timesteps(20000, torch.Generator().manual_seed(0), 1000))


# --- naming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["my_concept", "dog-2.v1", "évil名", "Ωmega_3", "٣_cats"])
def test_names_of_letters_digits_dash_underscore_and_dot_are_kept(tmp_path, name):
    path = naming.output_path(tmp_path, name)
    assert path.parent == tmp_path.resolve() and path.name == f"{name}.safetensors"


@pytest.mark.parametrize("name,suggestion", [
    ("evil/dd1", "evil_dd1"), ("../../etc/passwd", "etc_passwd"), ("/abs/path", "abs_path"), ("my concept", "my_concept"),
    ("a\\b:c", "a_b_c"), ("..hidden", "hidden"), ("a..b", "a.b"), ("trailing.", "trailing"), ("évil名!", "évil名"),
    ("e\u0301vil", "évil")])  # the last: é written as e + combining accent, a different file name from é
def test_other_names_are_refused_with_a_usable_suggestion(tmp_path, name, suggestion):
    with pytest.raises(ValueError, match="letters and digits") as raised:
        naming.output_path(tmp_path, name)
    assert f"try {suggestion!r}" in str(raised.value)
    assert naming.checked_name(suggestion) == suggestion


def test_names_that_cleaning_would_merge_stay_distinct():
    # evil/dd1 and evil_dd1 were both written as evil_dd1, and évil名 as vil: one run overwrote another's files
    assert naming.checked_name("evil_dd1") == "evil_dd1" and naming.checked_name("évil名") == "évil名"
    for name in ("evil/dd1", "evil dd1", "évil名?"):
        with pytest.raises(ValueError, match="may hold only"):
            naming.checked_name(name)


@pytest.mark.parametrize("name", ["", "   ", ".", "..", "///"])
def test_unusable_names_are_errors(tmp_path, name):
    with pytest.raises(ValueError, match=f"output name {name!r}"):
        naming.output_path(tmp_path, name)


def test_surrounding_spaces_are_not_part_of_a_name():
    assert naming.checked_name("  dog \n") == "dog"


def test_an_over_long_name_is_refused_not_cut():
    fits = "名" * (naming.MAX_NAME_BYTES // 3)  # 3 bytes each in UTF-8, as file systems count
    assert naming.checked_name(fits) == fits
    with pytest.raises(ValueError, match=f"{naming.MAX_NAME_BYTES} bytes") as raised:
        naming.checked_name(fits + "ab")
    suggestion = re.search(r"try '(.*)'\.$", str(raised.value)).group(1)
    assert naming.checked_name(suggestion) == suggestion


# --- file modes -----------------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_mode_of_a_plain_write(tmp_path, umask):
    # others on a shared machine (a ComfyUI server running as another user) must be able to read the files
    previous = os.umask(umask)
    try:
        save_atomic(tmp_path / "saved.safetensors", {"a": torch.zeros(2)})
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "saved.safetensors").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain").stat().st_mode), oct(mode)


# --- exporters ------------------------------------------------------------------------------------

def test_embedding_file_layout(tmp_path):
    path = tmp_path / "e.safetensors"
    exporters.save_embedding(path, torch.randn(2, 768), torch.randn(2, 1280), metadata={"method": "x"})
    sd = load_file(str(path))
    assert sd["clip_l"].shape == (2, 768) and sd["clip_g"].shape == (2, 1280)
    with pytest.raises(ValueError, match="768"):
        exporters.embedding_tensors(torch.randn(1, 1024))


def test_diff_and_low_rank_lora_keys_reconstruct_the_delta():
    gen = torch.Generator().manual_seed(3)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    delta = torch.randn(16, 4, generator=gen) @ torch.randn(4, 12, generator=gen)  # rank 4
    diff = exporters.diff_lora_tensors({key: delta})
    assert list(diff) == ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff"]
    low = exporters.low_rank_lora_tensors({key: delta}, rank=4)
    module = key[:-len(".weight")]
    up, down, alpha = low[f"{module}.lora_up.weight"], low[f"{module}.lora_down.weight"], low[f"{module}.alpha"]
    assert up.shape == (16, 4) and down.shape == (4, 12)
    assert torch.allclose(up @ down * (alpha / 4), delta, atol=1e-4)
    assert math.isclose(float(alpha), 4.0)


def test_channel_summed_masked_mse_is_custom_diffusions_normalisation():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    mask = (torch.rand(2, 1, 6, 6, generator=gen) > 0.5).float()
    official = (((a - b) ** 2 * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
    assert torch.allclose(losses.masked_mse(a, b, mask, channel_sum=True), official, rtol=1e-5)
    assert torch.allclose(losses.masked_mse(a, b, channel_sum=True), 4 * ((a - b) ** 2).mean(), rtol=1e-5)

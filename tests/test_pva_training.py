"""PVATrainer and PVAIdentityTune in the real ComfyUI on the tiny 9-channel inpainting checkpoint, and
their pure parts."""
import pytest
import torch

from harness.comfy_env import pack_module
from harness.tensors import changed_keys, unpatched_state
from harness.pack_nodes import run_node
from harness.pva_assets import arcface_path, pva_path, sd15_inpaint_checkpoint_path

from personalization_nodes.training.pva import binned_timestep, face_box_mask, rotating_references, stage1_references


def photos(count=2, seed=0):
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def inpainting(comfy):
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15_inpaint_checkpoint_path().name)[:3]


@pytest.fixture(scope="module")
def pva(comfy):
    arcface_path()
    return run_node("PVALoader", pva_name=pva_path("arcface").name)[0]


def test_binning_references_and_mask():
    gen = torch.Generator().manual_seed(0)
    assert all(250 <= binned_timestep(1, 4, 1000, gen) < 500 for _ in range(50))
    assert rotating_references(0, (0,), gen) == [(0, True)] == stage1_references(0, (0,), gen)
    refs = rotating_references(1, (0, 1, 2), gen)
    assert [i for i, _ in refs] == [0, 2, 2] and refs[1][1] != refs[2][1], "others + a flipped copy of the last"
    group = tuple(range(10, 18))
    for _ in range(30):
        refs = stage1_references(12, group, gen)
        plain = [i for i, flipped in refs if not flipped]
        assert 1 <= len(plain) <= 5 and 12 not in plain and len(set(plain)) == len(plain) and set(plain) <= set(group)
        assert all(i == plain[-1] for i, flipped in refs if flipped), "only the last one may get a flipped copy"
    mask = face_box_mask(256, 256)
    assert mask.sum() == (223 - 35) * (220 - 32) and mask[35, 32] == 1 and mask[34, 32] == 0


def test_identity_word_starts_where_the_official_code_starts_it(comfy, inpainting):
    """The official stage-1 config's init_token "ktn+pll+ucd" is no token of CLIP's vocabulary: its lookup
    gives the unknown token, which in CLIP is <|endoftext|>. So an empty init_word starts the identity word
    as the end-of-text embedding; a word starts it as that word's embedding."""
    import os

    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    official = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer"))
    end_of_text = official.convert_tokens_to_ids("<|endoftext|>")
    assert official.convert_tokens_to_ids("ktn+pll+ucd") == official.unk_token_id == end_of_text == 49407
    person = official("person")["input_ids"][1]
    model, clip, _ = inpainting
    arcface_path()
    training = pack_module("nodes.pva_training")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    for init_word, row in (("", end_of_text), ("person", person)):
        words = training.initial_pva(model, clip, "arcface", init_word, 0).weights.identity_word
        assert set(words) == {"l"}
        assert torch.equal(words["l"].detach().cpu(), table[row][None]), init_word


def test_identity_tune_changes_only_the_projections_and_the_word(comfy, inpainting, pva):
    model, clip, vae = inpainting
    unet, text, pva_before = unpatched_state(model.model), unpatched_state(clip.cond_stage_model), unpatched_state(pva.weights)
    patched, tuned, name = run_node("PVAIdentityTune", model=model, clip=clip, vae=vae, pva=pva, photos=photos(2),
                                    name="tune_test", steps=2, learning_rate=1e-3, word_learning_rate=1e-2,
                                    timestep_bins=2, seed=3, checkpoint_every=0, resolution=64)
    for before, after in ((unet, unpatched_state(model.model)), (text, unpatched_state(clip.cond_stage_model)), (pva_before, unpatched_state(pva.weights))):
        assert before.keys() == after.keys()
        assert not changed_keys(before, after), f"inputs are never modified: {changed_keys(before, after)[:5]}"
    changed = {k for k, v in unpatched_state(tuned.weights).items() if not torch.equal(v.to(pva_before[k]), pva_before[k])}
    allowed = {k for k in pva_before if k.startswith(("parallel.", "identity_word."))}
    assert changed and changed <= allowed, f"only projections and the word may change, got {sorted(changed - allowed)}"
    assert any(k.startswith("identity_word.") for k in changed) and any(k.startswith("parallel.") for k in changed)
    loaded = run_node("PVALoader", pva_name=name)[0]
    assert all(torch.equal(v, unpatched_state(tuned.weights)[k].cpu()) for k, v in unpatched_state(loaded.weights).items())
    assert patched.model_options["transformer_options"]["personalization"].processors[0].name == "pva"


def test_tune_lowers_the_loss_and_resumes_exactly(comfy, inpainting, pva, tmp_path):
    from harness.training_probes import interrupting_at, probe_loss
    nodes_tune = pack_module("nodes.pva_training")
    glue = pack_module("nodes.training_glue")
    loop, runs = pack_module("training.loop"), pack_module("training.runs")
    model, clip, vae = inpainting

    def run(steps, checkpoint=None, interrupt_at=None):
        with glue.training_mode():
            tune = nodes_tune.prepare_identity_tune(model, clip, vae, pva, glue.clone_tensors(photos(2)), bins=2, seed=1)
            before = probe_loss(tune.step, 0, 1, seed=99)
            optimizer = nodes_tune.identity_tune_optimizer(tune.params, 3e-3, 3e-2)
            checkpoints = checkpoint and runs.RunCheckpoints(checkpoint, tune.fingerprint)
            loop.train(tune.params, tune.step, optimizer, loop.LoopSettings(steps, 2, 1, 0, checkpoints),
                       check_interrupted=interrupting_at(interrupt_at))
            after = probe_loss(tune.step, 0, 1, seed=99)
        return before, after, {k: v.detach().clone() for k, v in tune.params.items()}

    before, after, straight = run(3)
    assert after < before, f"loss on a fixed probe {before:.5f} -> {after:.5f}"
    checkpoint = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run(3, checkpoint, interrupt_at=4)  # stops inside step 1 (2 micro-batches per step)
    assert any(checkpoint.iterdir())
    _, _, resumed = run(3, checkpoint)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_tune_without_photos_is_a_clear_error(comfy, inpainting, pva):
    model, clip, vae = inpainting
    with pytest.raises(ValueError, match="PVAIdentityTune: no photos"):
        run_node("PVAIdentityTune", model=model, clip=clip, vae=vae, pva=pva, photos=torch.zeros(0, 64, 64, 3),
                 name="x", steps=1, learning_rate=1e-5, word_learning_rate=1e-3, timestep_bins=2, seed=0,
                 checkpoint_every=0)


def test_stage1_trainer_trains_projections_transformer_and_word_only(comfy, inpainting):
    model, clip, vae = inpainting
    arcface_path()
    unet, text = unpatched_state(model.model), unpatched_state(clip.cond_stage_model)
    trained, name = run_node("PVATrainer", model=model, clip=clip, vae=vae, images=photos(4, seed=5), images_per_identity=2,
                             name="stage1_test", encoder="arcface", steps=2, learning_rate=1e-4,
                             transformer_learning_rate=1e-4, word_learning_rate=1e-3, timestep_bins=2,
                             init_word="person", seed=0, checkpoint_every=0, resolution=64)
    assert not changed_keys(unet, unpatched_state(model.model))
    assert not changed_keys(text, unpatched_state(clip.cond_stage_model))
    start = unpatched_state(pack_module("nodes.pva_training").initial_pva(model, clip, "arcface", "person", 0).weights)
    after = {k: v.cpu() for k, v in unpatched_state(trained.weights).items()}
    changed = {k.split(".")[0] for k in start if not torch.equal(after[k].to(start[k]), start[k])}
    assert changed == {"parallel", "token_transformer", "identity_word"}, changed
    from safetensors import safe_open
    with safe_open(str(pva_path("arcface").parent / name), "pt") as f:
        assert not any(k.startswith("face_encoder.") for k in f.keys()), "the stock backbone is not copied"
    loaded = run_node("PVALoader", pva_name=name)[0]
    assert loaded.weights.encoder == "arcface" and loaded.weights.face_encoder is not None
    with pytest.raises(ValueError, match="cannot be grouped into identities of 3"):
        run_node("PVATrainer", model=model, clip=clip, vae=vae, images=photos(4), images_per_identity=3, name="x",
                 encoder="arcface", steps=1, learning_rate=1e-5, transformer_learning_rate=1e-5, word_learning_rate=1e-3,
                 timestep_bins=2, init_word="person", seed=0, checkpoint_every=0)

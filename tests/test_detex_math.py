"""DETEX pure-torch parts vs slow, obvious formulations (spec detex.md §2–3)."""
import pytest
import torch

from personalization_nodes.training.detex_data import SubjectDataError, attribute_inputs, dilate, prepare_subject
from personalization_nodes.training.detex_loss import (
    ALL_ELEMENTS, ATTENTION_LOSS_WEIGHT, FULL, MASK_AREA, SUBJECT, attention_mask_loss, choose_branches, latent_mask,
    masked_diffusion_mse)
from personalization_nodes.training.detex_mappers import (
    CLIP_LAYER, FREE_VECTORS, MAPPERS, AttributeEmbeddings, AttributeMapper, MapperFileError, load_mappers,
    map_attributes, save_mappers)
from personalization_nodes.training.detex_masks import border_key_mask, fill_holes
from personalization_nodes.training.detex_prompts import DEFAULT_TEMPLATE, PromptTemplate, TemplateError

FEATURES, WIDTH, PATCHES, IMAGES = 16, 12, 5, 3


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def slow_mlp(layers, x):
    """Linear–LayerNorm–LeakyReLU ×2 then Linear, written out for one vector."""
    def linear(layer, v):
        return torch.stack([(layer.weight[o] * v).sum() + layer.bias[o] for o in range(layer.weight.shape[0])])

    def layer_norm(layer, v):
        mean = v.sum() / v.numel()
        var = ((v - mean) ** 2).sum() / v.numel()
        return (v - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias

    def leaky(v):
        return torch.where(v > 0, v, 0.01 * v)
    v = leaky(layer_norm(layers[1], linear(layers[0], x)))
    v = leaky(layer_norm(layers[4], linear(layers[3], v)))
    return linear(layers[6], v)


def test_mapper_shapes_and_elite_formulation():
    mapper = _randomize(AttributeMapper(FEATURES, torch.zeros(WIDTH), hidden=8))
    states = torch.randn(2, 1 + PATCHES, FEATURES)
    out = mapper(states)
    assert out.shape == (2, WIDTH)
    for b in range(2):
        cls_word = slow_mlp(mapper.cls_branch, states[b, 0])
        patch_words = torch.stack([slow_mlp(mapper.patch_branch, states[b, 1 + p]) for p in range(PATCHES)])
        torch.testing.assert_close(out[b], cls_word + patch_words.sum(0) / PATCHES, atol=1e-5, rtol=1e-5)


def test_untrained_mapper_returns_the_initial_word_for_every_image():
    init = torch.randn(WIDTH)
    mapper = AttributeMapper(FEATURES, init, hidden=8)
    out = mapper(torch.randn(4, 1 + PATCHES, FEATURES))
    torch.testing.assert_close(out, init.expand(4, WIDTH))


def test_mapper_rejects_features_without_patch_tokens():
    with pytest.raises(ValueError, match="hidden states"):
        AttributeMapper(FEATURES, torch.zeros(WIDTH))(torch.randn(2, FEATURES))


def _features():
    gen = torch.Generator().manual_seed(1)
    return {a: torch.randn(IMAGES, 2, 1 + PATCHES, FEATURES, generator=gen) for a in ("pose", "background")}


def _inits():
    return {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)}


def test_attribute_embeddings_mappers_use_the_flipped_features_of_flipped_samples():
    features = _features()
    embeddings = _randomize(AttributeEmbeddings(MAPPERS, IMAGES, _inits(), features))
    index, flipped = torch.tensor([2, 0, 2]), torch.tensor([0, 1, 1])
    out = embeddings("pose", index, flipped)
    assert out.shape == (3, WIDTH)
    expected = embeddings.mappers["pose"](torch.stack([features["pose"][2, 0], features["pose"][0, 1], features["pose"][2, 1]]))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[0], out[2])
    assert embeddings.per_image("background").shape == (IMAGES, WIDTH)


def test_attribute_embeddings_free_vectors_are_per_image():
    inits = _inits()
    embeddings = AttributeEmbeddings(FREE_VECTORS, IMAGES, inits)
    torch.testing.assert_close(embeddings.per_image("pose"), inits["pose"].expand(IMAGES, WIDTH))
    with torch.no_grad():
        embeddings.vectors["pose"][1] += 1
    out = embeddings("pose", torch.tensor([1, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(out, (inits["pose"] + 1).expand(2, WIDTH))


def test_gradient_reaches_only_the_mapper_of_the_attribute_used():
    embeddings = _randomize(AttributeEmbeddings(MAPPERS, IMAGES, _inits(), _features()))
    embeddings("pose", torch.tensor([0, 1]), torch.tensor([0, 0])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embeddings.mappers["pose"].parameters())
    assert all(p.grad is None for p in embeddings.mappers["background"].parameters())
    assert all(not b.requires_grad for b in embeddings.buffers())


def test_exported_mappers_give_the_training_images_words_back(tmp_path):
    features = {a: torch.randn(IMAGES, 2, 1 + PATCHES, FEATURES) for a in ("pose", "background")}
    attributes = AttributeEmbeddings(MAPPERS, IMAGES, {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)},
                                     features)
    _randomize(attributes)
    path = tmp_path / "subject_detex_mappers.safetensors"
    save_mappers(path, attributes, 512, {"class_word": "dog"})
    mappers, metadata = load_mappers(path)
    assert metadata["clip_layer"] == CLIP_LAYER and metadata["resolution"] == "512" and metadata["class_word"] == "dog"
    assert metadata["attribute_source"] == MAPPERS and "pose" in metadata["inputs"]
    assert not any(p.requires_grad for p in mappers.parameters())
    words = map_attributes(mappers, {a: f[:, 0] for a, f in features.items()})
    for attribute in ("pose", "background"):
        torch.testing.assert_close(words[attribute], attributes.per_image(attribute))
    with pytest.raises(ValueError, match="features 16 wide"):
        map_attributes(mappers, {a: f[:, 0, :, :8] for a, f in features.items()})
    free = AttributeEmbeddings(FREE_VECTORS, IMAGES, {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)})
    with pytest.raises(ValueError, match="free vectors"):
        save_mappers(tmp_path / "free.safetensors", free, 512, {})
    from safetensors.torch import save_file
    save_file({"clip_l": torch.zeros(1, WIDTH)}, str(tmp_path / "embedding.safetensors"))
    with pytest.raises(MapperFileError, match="not a DETEX mapper file"):
        load_mappers(tmp_path / "embedding.safetensors")


def test_attribute_embeddings_reject_bad_inputs():
    with pytest.raises(ValueError, match="attribute source"):
        AttributeEmbeddings("clip", IMAGES, _inits())
    with pytest.raises(ValueError, match="features"):
        AttributeEmbeddings(MAPPERS, IMAGES, _inits(), None)
    with pytest.raises(ValueError, match="unknown attribute"):
        AttributeEmbeddings(FREE_VECTORS, IMAGES, _inits())("colour", torch.tensor([0]), torch.tensor([0]))


# ---- masked loss ------------------------------------------------------------------------------------

def slow_masked_mse(pred, target, mask, normalization):
    batch, channels, height, width = pred.shape
    per_sample = []
    total, count = 0.0, 0
    for b in range(batch):
        s, area = 0.0, 0.0
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    m = float(mask[b, 0, y, x])
                    s += m * float(pred[b, c, y, x] - target[b, c, y, x]) ** 2
                    area += m
                    total += (m * float(pred[b, c, y, x]) - m * float(target[b, c, y, x])) ** 2
                    count += 1
        per_sample.append(s / area)
    return total / count if normalization == ALL_ELEMENTS else sum(per_sample) / batch


@pytest.mark.parametrize("normalization", [ALL_ELEMENTS, MASK_AREA])
def test_masked_diffusion_mse_matches_the_slow_reference(normalization):
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 4, 5, 6, generator=gen)
    mask = (torch.rand(2, 1, 5, 6, generator=gen) > 0.4).float()
    got = masked_diffusion_mse(pred, target, mask, normalization)
    assert got.item() == pytest.approx(slow_masked_mse(pred, target, mask, normalization), rel=1e-5)


def test_masked_diffusion_mse_with_a_full_mask_is_the_plain_mse():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ones = torch.ones(2, 1, 3, 3)
    plain = torch.nn.functional.mse_loss(pred, target)
    for normalization in (ALL_ELEMENTS, MASK_AREA):
        torch.testing.assert_close(masked_diffusion_mse(pred, target, ones, normalization), plain)
    with pytest.raises(ValueError, match="normalization"):
        masked_diffusion_mse(pred, target, ones, "sum")


def slow_attention_mask_loss(maps, masks):
    """Break-A-Scene, written out: per word, mask sampled at the map's pixels (nearest), map over its
    maximum, mean squared difference; summed over the words."""
    words, h, w = maps.shape
    height, width = masks.shape[1:]
    total = 0.0
    for k in range(words):
        peak = max(float(maps[k, y, x]) for y in range(h) for x in range(w))
        squared = 0.0
        for y in range(h):
            for x in range(w):
                target = float(masks[k, y * height // h, x * width // w])
                squared += (float(maps[k, y, x]) / peak - target) ** 2
        total += squared / (h * w)
    return total


def test_attention_mask_loss_matches_the_slow_reference():
    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(2, 4, 4, generator=gen) * 0.05  # attention probabilities are small
    subject = (torch.rand(16, 16, generator=gen) > 0.5).float()
    masks = torch.stack([subject, 1 - subject])
    got = attention_mask_loss(maps, masks)
    assert got.item() == pytest.approx(slow_attention_mask_loss(maps, masks), rel=1e-5)
    perfect = torch.stack([latent_mask(masks, (4, 4))[k, 0] * 0.3 + 1e-9 for k in range(2)])
    assert attention_mask_loss(perfect, masks).item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="maps"):
        attention_mask_loss(maps, masks[:1])


def test_latent_mask_is_nearest_neighbour_downsampling():
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:12, 0:8] = 1
    small = latent_mask(mask, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    expected = torch.tensor([[mask[0, 4 * y, 4 * x] for x in range(4)] for y in range(4)])
    torch.testing.assert_close(small[0, 0], expected)


def test_choose_branches():
    gen = torch.Generator().manual_seed(0)
    assert choose_branches(5, 0.0, gen) == [FULL] * 5
    assert choose_branches(5, 1.0, gen) == [SUBJECT] * 5
    draws = choose_branches(2000, 0.3, torch.Generator().manual_seed(1))
    assert abs(draws.count(SUBJECT) / 2000 - 0.3) < 0.05
    assert choose_branches(8, 0.5, torch.Generator().manual_seed(2)) == choose_branches(8, 0.5, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError):
        choose_branches(1, 1.5, gen)


# ---- prompt template -------------------------------------------------------------------------------

def test_default_template_renders_every_branch():
    template = PromptTemplate.parse(DEFAULT_TEMPLATE)
    assert template.render("<V>", "dog", "<P>", "<B>") == "photo of a <V> dog with <P> pose in <B> background"
    assert template.render("<V>", "dog", "<P>", None) == "photo of a <V> dog with <P> pose"
    assert template.render("<V>", "dog", None, "<B>") == "photo of a <V> dog in <B> background"
    assert template.render("<V>", "dog") == "photo of a <V> dog"


def test_template_clauses_in_any_order_and_inference_templates_without_clauses():
    template = PromptTemplate.parse("[{B} background, ]a {V} {class}[ in {P} pose], on the beach")
    assert template.render("v", "cat", "p", "b") == "b background, a v cat in p pose, on the beach"
    assert template.render("v", "cat") == "a v cat, on the beach"
    plain = PromptTemplate.parse("a {V} {class} on the moon", require_attributes=False)
    assert plain.render("v", "cat") == "a v cat on the moon"
    with pytest.raises(TemplateError, match="no \\[ \\] clause"):
        plain.render("v", "cat", pose="p")


@pytest.mark.parametrize("text, message", [
    ("photo of a {class}[ with {P} pose][ in {B} background]", "exactly once"),
    ("photo of a {V} {V} {class}[ with {P} pose][ in {B} background]", "exactly once"),
    ("photo of a {V} {class} with {P} pose[ in {B} background]", "needs a clause|inside a"),
    ("photo of a {V} {class}[ with {P} pose]", "needs a clause"),
    ("photo of a {V} {class}[ with {P} pose in {B} background]", "exactly one of"),
    ("photo of a {V} {class}[ with [{P}] pose][ in {B} background]", "unbalanced"),
    ("photo of a {V} {noun}[ with {P} pose][ in {B} background]", "unknown placeholder"),
    ("photo of a {V} {class}[ with {P} pose][ in {P} background]", "two clauses|exactly one"),
])
def test_bad_templates_are_rejected(text, message):
    with pytest.raises(TemplateError, match=message):
        PromptTemplate.parse(text)


# ---- data ------------------------------------------------------------------------------------------

def _subject(count=3, size=32):
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(count, size, size, 3, generator=gen)
    masks = torch.zeros(count, size, size)
    masks[:, 8:24, 10:20] = 1
    return images, masks


def test_prepare_subject_crops_resizes_and_keeps_masks_binary():
    images, masks = _subject()
    wide = torch.cat([images, images[:, :, :8]], dim=2)  # 32 x 40: centre crop drops 4 columns each side
    wide_masks = torch.cat([masks, torch.zeros(3, 32, 8)], dim=2)
    subject = prepare_subject(wide, wide_masks, resolution=16)
    assert subject.images.shape == (3, 16, 16, 3) and subject.masks.shape == (3, 16, 16)
    assert set(subject.masks.unique().tolist()) <= {0.0, 1.0}
    same = prepare_subject(images, masks, resolution=32)
    torch.testing.assert_close(same.images, images)
    torch.testing.assert_close(same.masks, masks)


def test_mask_dilation_grows_and_shrinks_by_whole_pixels():
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 1
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 2).sum() == 25
    assert dilate(dilate(mask, 2), -1).sum() == 9


@pytest.mark.parametrize("count", [1, 2, 11])
def test_prepare_subject_rejects_image_counts_outside_3_to_10(count):
    images, masks = _subject(count)
    with pytest.raises(SubjectDataError, match="3 to 10 images"):
        prepare_subject(images, masks, 32)


def test_prepare_subject_rejects_wrong_mask_size_and_count():
    images, masks = _subject()
    with pytest.raises(SubjectDataError, match="one mask per image"):
        prepare_subject(images, masks[:, :16], 32)
    with pytest.raises(SubjectDataError, match="one mask per image"):
        prepare_subject(images, masks[:2], 32)


def test_prepare_subject_rejects_an_empty_mask():
    images, masks = _subject()
    masks[1] = 0
    with pytest.raises(SubjectDataError, match=r"image\(s\) \[1\].*empty"):
        prepare_subject(images, masks, 32)


def test_attribute_inputs_split_subject_and_background_and_flip():
    images, masks = _subject()
    inputs = attribute_inputs(prepare_subject(images, masks, 32))
    assert inputs["pose"].shape == (3, 2, 32, 32, 3)
    torch.testing.assert_close(inputs["pose"][:, 0], images * masks[..., None])
    torch.testing.assert_close(inputs["background"][:, 0], images * (1 - masks[..., None]))
    torch.testing.assert_close(inputs["pose"][:, 1], (images * masks[..., None]).flip(2))


# ---- mask estimation --------------------------------------------------------------------------------

def test_border_key_mask_finds_a_subject_on_a_plain_background_and_fills_its_holes():
    image = torch.full((40, 40, 3), 0.9)
    image[10:30, 12:28] = torch.tensor([0.2, 0.3, 0.7])  # subject
    image[16:24, 18:22] = 0.9  # a hole of background colour inside the subject
    image[2, 35] = 0.0  # a speck
    mask = border_key_mask(image, threshold=0.12, smoothing=1)
    expected = torch.zeros(40, 40)
    expected[10:30, 12:28] = 1
    torch.testing.assert_close(mask, expected)


def test_fill_holes_matches_a_slow_flood_fill():
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(12, 12, generator=gen) > 0.55).float()
    height, width = mask.shape
    reach = set((y, x) for y in range(height) for x in range(width)
                if (y in (0, height - 1) or x in (0, width - 1)) and mask[y, x] == 0)
    frontier = list(reach)
    while frontier:
        y, x = frontier.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] == 0 and (ny, nx) not in reach:
                    reach.add((ny, nx))
                    frontier.append((ny, nx))
    expected = torch.tensor([[0.0 if (y, x) in reach else 1.0 for x in range(width)] for y in range(height)])
    torch.testing.assert_close(fill_holes(mask), expected)


# ---- one training step ------------------------------------------------------------------------------

def test_detex_step_prompts_masks_and_loss_match_a_slow_reference():
    """Per sample the ε-MSE is a per-element mean (spec §3.3/§3.5 [R]: "standard ε-MSE", Break-A-Scene's
    mean, the diffusers prior loss's mean): full-branch and regularisation samples over the elements their
    mask keeps, subject-branch samples over all elements (default) or the kept ones; no channel sum."""
    from personalization_nodes.training.detex import (
        BACKGROUND_WORD, POSE_WORD, SUBJECT_WORD, DetexSettings, DetexStep, PoolView, RegularisationView)
    from personalization_nodes.training.loop import MicroStep

    gen = torch.Generator().manual_seed(11)
    pool = []
    for k in range(6):
        subject_mask = (torch.rand(1, 4, 4, generator=gen) > 0.5).float()
        subject_mask[0, 0, 0] = 1
        valid = torch.ones(1, 4, 4)
        valid[0, 3] = 0
        pool.append(PoolView(k % IMAGES, torch.randn(4, 4, 4, generator=gen), subject_mask, valid, f"view{k} ", bool(k % 2)))
    symmetric = torch.randn(4, 4, 4, generator=gen)
    symmetric = symmetric + symmetric.flip(-1)  # the same latent either way round
    regularisation = [RegularisationView(symmetric, symmetric.flip(-1), torch.full((1, 3, WIDTH), 0.1))]
    attributes = AttributeEmbeddings(FREE_VECTORS, IMAGES, {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)})
    subject_word = torch.randn(1, WIDTH, requires_grad=True)
    seen = []

    def encode_text(text, vectors):
        seen.append((text, sorted(vectors)))
        context = torch.stack([v.reshape(WIDTH) for v in vectors.values()]).sum(0).expand(1, 3, WIDTH)
        return context, {name: [position] for position, name in enumerate(vectors)}

    calls = {}

    def denoise(x_t, sigma, context):
        out = 0.7 * x_t + context.mean() + context[:, :, :4].mean(1)[:, :, None, None]
        calls.update(x_t=x_t, sigma=sigma, out=out)
        return out

    for normalization in (ALL_ELEMENTS, MASK_AREA):
        seen.clear()
        settings = DetexSettings(micro_batch=8, subject_branch_probability=0.5, mask_normalization=normalization)
        step = DetexStep(pool, regularisation, subject_word, attributes, PromptTemplate.parse(DEFAULT_TEMPLATE), "dog",
                         encode_text, denoise, torch.linspace(0.1, 10, 1000), "eps", settings)
        loss = step(MicroStep(0, 0, torch.Generator().manual_seed(3)))
        total = 0.0
        regs = calls["x_t"].shape[0] - len(seen)  # the regularisation samples follow the training views
        assert 0 < regs < 8
        for i in range(len(seen), len(seen) + regs):
            sigma = float(calls["sigma"][i])
            eps_hat = (calls["x_t"][i] - calls["out"][i].detach()) / sigma
            eps = (calls["x_t"][i] - symmetric) / sigma
            squared = 0.0
            for c in range(4):
                for y in range(4):
                    for x in range(4):
                        squared += float(eps_hat[c, y, x] - eps[c, y, x]) ** 2
            total += squared / 64
        for i, (text, names) in enumerate(seen):
            view = pool[int(text.split(" ")[0][4:])]
            full = BACKGROUND_WORD in names
            expected = (f"{view.prefix}photo of a embedding:{SUBJECT_WORD} dog with embedding:{POSE_WORD} pose"
                        + (f" in embedding:{BACKGROUND_WORD} background" if full else ""))
            assert text == expected
            sigma = float(calls["sigma"][i])
            eps_hat = (calls["x_t"][i] - calls["out"][i].detach()) / sigma
            eps = (calls["x_t"][i] - view.latent) / sigma
            mask = view.valid_mask if full else view.valid_mask * view.subject_mask
            squared, masked_squared, area = 0.0, 0.0, 0.0
            for c in range(4):
                for y in range(4):
                    for x in range(4):
                        m = float(mask[0, y, x])
                        d = float(eps_hat[c, y, x] - eps[c, y, x])
                        squared += (m * d) ** 2
                        masked_squared += m * d * d
                        area += m
            if full or normalization == MASK_AREA:
                total += masked_squared / area
            else:
                total += squared / 64
        assert {BACKGROUND_WORD in names for _, names in seen} == {True, False}
        assert loss.item() == pytest.approx(total / (len(seen) + regs), rel=1e-4)
    loss.backward()
    assert subject_word.grad is not None and attributes.vectors["pose"].grad is not None


def test_attention_regulariser_adds_break_a_scene_loss_of_subject_and_background_words():
    """With the switch on, the step's loss grows by λ × the mean over training samples of the maps'
    loss: [V] against the subject mask, [B_i] (full branch only) against its complement."""
    from personalization_nodes.attention.token_maps import MapRecorder
    from personalization_nodes.training.detex import BACKGROUND_WORD, SUBJECT_WORD, DetexSettings, DetexStep, PoolView
    from personalization_nodes.training.loop import MicroStep

    gen = torch.Generator().manual_seed(2)
    pool = [PoolView(k % IMAGES, torch.randn(4, 8, 8, generator=gen), (torch.rand(1, 8, 8, generator=gen) > 0.5).float(),
                     torch.ones(1, 8, 8), f"view{k} ", False) for k in range(4)]
    attributes = AttributeEmbeddings(FREE_VECTORS, IMAGES, {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)})
    subject_word = torch.randn(1, WIDTH, requires_grad=True)
    recorder = MapRecorder(frozenset())
    prompts, captured = [], {}

    def encode_text(text, vectors):
        names = list(vectors)
        prompts.append((pool[int(text.split(" ")[0][4:])], names))
        context = torch.zeros(1, 5, WIDTH)
        context[0, 1:1 + len(names)] = torch.cat([v.reshape(1, WIDTH) for v in vectors.values()])
        return context, {name: [1 + i] for i, name in enumerate(names)}

    def denoise(x_t, sigma, context):
        # two map-layer calls of head-mean maps [B, T, 4, 4] that depend on the context (gradients reach it)
        maps = torch.sigmoid(context.sum(-1))[:, :, None, None] * (0.2 + torch.arange(16.0).reshape(4, 4) / 16)
        recorder.maps.extend([maps, 2 * maps])
        captured["layer_mean"] = 1.5 * maps.detach()
        return 0.5 * x_t

    losses = {}
    for weight in (0.0, ATTENTION_LOSS_WEIGHT):
        prompts.clear()
        settings = DetexSettings(micro_batch=4, subject_branch_probability=0.5, attention_loss_weight=weight)
        step = DetexStep(pool, [], subject_word, attributes, PromptTemplate.parse(DEFAULT_TEMPLATE), "dog",
                         encode_text, denoise, torch.linspace(0.1, 10, 1000), "eps", settings, recorder)
        losses[weight] = step(MicroStep(0, 0, torch.Generator().manual_seed(7)))
    assert {BACKGROUND_WORD in names for _, names in prompts} == {True, False}
    expected = 0.0
    for row, (view, names) in enumerate(prompts):
        words = [(names.index(SUBJECT_WORD), view.subject_mask[0])]
        if BACKGROUND_WORD in names:
            words.append((names.index(BACKGROUND_WORD), 1 - view.subject_mask[0]))
        expected += slow_attention_mask_loss(torch.stack([captured["layer_mean"][row, 1 + i] for i, _ in words]),
                                             torch.stack([m for _, m in words]))
    difference = losses[ATTENTION_LOSS_WEIGHT] - losses[0.0]
    assert difference.item() == pytest.approx(ATTENTION_LOSS_WEIGHT * expected / len(prompts), rel=1e-4)
    assert recorder.maps == []
    difference.backward()
    assert subject_word.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="MapRecorder"):
        DetexStep(pool, [], subject_word, attributes, PromptTemplate.parse(DEFAULT_TEMPLATE), "dog", encode_text,
                  denoise, torch.linspace(0.1, 10, 1000), "eps", DetexSettings(attention_loss_weight=0.01))


def test_regularisation_images_are_mirrored_half_of_the_time():
    """Custom Diffusion's MaskBase flips every image, regularisation images included, with p 1/2."""
    from personalization_nodes.training.detex import DetexSettings, DetexStep, PoolView, RegularisationView
    from personalization_nodes.training.loop import micro_step_generator, MicroStep

    pool = [PoolView(0, torch.zeros(4, 2, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2), "", False)]
    regularisation = [RegularisationView(torch.ones(4, 2, 2), -torch.ones(4, 2, 2), torch.zeros(1, 3, WIDTH))]
    attributes = AttributeEmbeddings(FREE_VECTORS, 1, {"pose": torch.randn(WIDTH), "background": torch.randn(WIDTH)})
    seen = []

    def denoise(x_t, sigma, context):
        seen.append(x_t.detach())
        return x_t

    step = DetexStep(pool, regularisation, torch.zeros(1, WIDTH), attributes, PromptTemplate.parse(DEFAULT_TEMPLATE),
                     "dog", lambda text, vectors: (torch.zeros(1, 3, WIDTH), {n: [0] for n in vectors}), denoise,
                     torch.full((1000,), 1e-4), "eps", DetexSettings(micro_batch=2))
    for m in range(100):
        step(MicroStep(0, m, micro_step_generator(4, 0, m)))
    rows = torch.cat(seen).flatten(1).mean(1)
    regs = rows[rows.abs() > 0.5]  # the training views' rows are ~0
    assert len(regs) > 50 and ((regs.abs() - 1).abs() < 1e-2).all()
    mirrored = float((regs < 0).float().mean())
    assert 0.35 < mirrored < 0.65, mirrored

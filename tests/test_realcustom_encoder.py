"""The released RealCustom model's image features: DINOv2 with registers against timm's own model, and the
reference views and token order of the released ShallowDeepPatchfySiglipDinoEncoder, written out here."""
import pytest
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
import torchvision.transforms
from personalization_nodes.attention.realcustom_encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RegisterViT,
    eight_bit,
    interleave_local_tokens,
    reference_views,
    resample_position_embedding,
)

TIMM_REG4 = dict(patch_size=14, embed_dim=128, depth=3, num_heads=2, init_values=1e-5, reg_tokens=4,
                 no_embed_class=True, num_classes=0)  # vit_large_patch14_reg4_dinov2's layout, reduced


def test_register_vit_equals_timms_penultimate_patch_tokens_with_the_position_grid_resampled():
    """timm builds the model at the view size and resamples the 518-px weights' grid when it loads them."""
    torch.manual_seed(0)
    trained_grid = timm_vit.VisionTransformer(img_size=70, **TIMM_REG4)  # 5×5 grid, like 37×37 at 518 px
    for parameter in trained_grid.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    state_dict = trained_grid.state_dict()
    timm_model = timm_vit.VisionTransformer(img_size=42, **TIMM_REG4).eval()  # 3×3 grid, like 27×27 at 384 px
    timm_model.load_state_dict(timm_vit.checkpoint_filter_fn(state_dict, timm_model))

    ours = RegisterViT.from_state_dict(state_dict, image_size=42)
    images = torch.rand(2, 3, 42, 42)
    normalised = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = timm_model.get_intermediate_layers(normalised, n={1})[0]  # the released code reads block depth-2
        got = ours(images)
    assert got.shape == (2, 9, 128)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_dinov2_file_checks():
    with pytest.raises(ValueError, match="missing reg_token"):
        RegisterViT.from_state_dict({"patch_embed.proj.weight": torch.zeros(64, 3, 14, 14), "cls_token": torch.zeros(1, 1, 64),
                                     "pos_embed": torch.zeros(1, 4, 64), "blocks.0.mlp.fc1.weight": torch.zeros(8, 64)})
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_embedding(torch.zeros(1, 1370, 8), 27)  # a class-token slot: not timm's reg4 layout


def test_reference_views_are_the_released_global_view_and_four_polyphase_components():
    images = torch.rand(2, 3, 100, 90)
    global_views, local_views = reference_views(images)
    reference = F.interpolate(images, size=(768, 768), mode="bilinear", align_corners=False)
    assert torch.equal(global_views, eight_bit(F.interpolate(reference, size=(384, 384), mode="bilinear",
                                                              align_corners=True)))
    assert local_views.shape == (8, 3, 384, 384)
    for b in range(2):
        for view, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # every second pixel, not crops
            assert torch.equal(local_views[4 * b + view], eight_bit(reference[b, :, row::2, col::2]))


def test_eight_bit_is_what_to_pil_image_and_back_gives():
    images = torch.rand(3, 16, 16)
    pil = torchvision.transforms.ToPILImage()(images)
    assert torch.equal(eight_bit(images), torchvision.transforms.ToTensor()(pil))


def test_local_tokens_are_interleaved_token_by_token_over_the_four_views():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(8, 3, 1)  # (sample, view) rows of 3 tokens
    out = interleave_local_tokens(tokens)
    assert out.shape == (2, 12, 1)
    for b in range(2):
        for token in range(3):
            for view in range(4):
                assert out[b, 4 * token + view, 0] == tokens[4 * b + view, token, 0]

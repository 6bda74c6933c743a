"""Custom Diffusion's augmentation and centre crop, shared by DisenDiff and DETEX (training/augmentation.py)."""
import torch

from personalization_nodes.training.augmentation import (
    CANVAS_GREY, CLOSE_PREFIXES, FAR_PREFIXES, center_square, draw_view, draw_views)


def test_augmentation_keeps_the_mask_aligned_with_the_pixels():
    size = 64
    mask = torch.zeros(size, size)
    mask[10:40, 20:36] = 1
    pixels = (0.9 * mask + 0.05)[..., None].expand(size, size, 3)  # the subject is bright, the rest dark
    seen = set()
    for seed in range(40):
        sample = draw_view(pixels, torch.Generator().manual_seed(seed), mask)
        seen.add(sample.prefix)
        bright = (sample.pixels[..., 0] > 0.5).float()
        disagree = (bright != sample.subject_mask).float().mean()
        assert disagree < 0.02, (seed, sample.prefix)
        assert sample.valid_mask.shape == (8, 8)
        if sample.prefix in FAR_PREFIXES:
            assert 0 < sample.valid_mask.sum() < 64
            outside = sample.valid_mask.repeat_interleave(8, 0).repeat_interleave(8, 1) == 0
            assert (sample.pixels[..., 0][outside] == CANVAS_GREY).float().mean() > 0.5
        else:
            assert sample.valid_mask.sum() == 64
    assert seen & set(FAR_PREFIXES) and seen & set(CLOSE_PREFIXES) and "" in seen


def test_augmentation_off_only_flips():
    pixels, mask = torch.rand(16, 16, 3), (torch.rand(16, 16) > 0.5).float()
    flips = set()
    for seed in range(10):
        sample = draw_view(pixels, torch.Generator().manual_seed(seed), mask, augment=False)
        expected = pixels.flip(1) if sample.flipped else pixels
        torch.testing.assert_close(sample.pixels, expected)
        torch.testing.assert_close(sample.subject_mask, mask.flip(1) if sample.flipped else mask)
        assert sample.prefix == "" and sample.valid_mask.shape == (2, 2)
        flips.add(sample.flipped)
    assert flips == {True, False}


def test_without_a_subject_mask_the_view_has_none_and_the_same_transform():
    """DisenDiff's use: no subject mask; the pixels and loss mask are those of the masked call."""
    pixels, mask = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)), torch.ones(64, 64)
    for seed in range(20):
        plain = draw_view(pixels, torch.Generator().manual_seed(seed))
        masked = draw_view(pixels, torch.Generator().manual_seed(seed), mask)
        assert plain.subject_mask is None
        torch.testing.assert_close(plain.pixels, masked.pixels)
        torch.testing.assert_close(plain.valid_mask, masked.valid_mask)
        assert (plain.prefix, plain.flipped) == (masked.prefix, masked.flipped)


def test_draw_views_without_augmentation_is_the_image_and_its_mirror():
    pixels = torch.rand(16, 16, 3)
    views = draw_views(pixels, torch.Generator().manual_seed(0), 0)
    assert [v.flipped for v in views] == [False, True]
    torch.testing.assert_close(views[1].pixels, pixels.flip(1))
    assert len(draw_views(pixels, torch.Generator().manual_seed(0), 5)) == 5


def test_center_square_crops_the_middle_and_resizes():
    images = torch.rand(2, 24, 40, 3)
    torch.testing.assert_close(center_square(images, 24, "bilinear"), images[:, :, 8:32])
    assert center_square(images, 16, "bicubic").shape == (2, 16, 16, 3)

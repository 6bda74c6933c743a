"""Shared GroupNorm vs. the official formulation (concatenate the reference along H, normalise, cut)."""
import pytest
import torch

from personalization_nodes.attention.group_norm import ReferenceSharedGroupNorm, norm_sharing


def slow_shared(norm, x, n_chunks):
    batch = x.shape[0] // n_chunks
    out = torch.empty_like(x)
    for c in range(n_chunks):
        ref = x[c * batch]
        for j in range(batch):
            i = c * batch + j
            joint = torch.cat([x[i], ref], dim=1).unsqueeze(0)
            out[i] = norm(joint)[0, :, : x.shape[2]]
    return out


@pytest.fixture
def norm():
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    return gn


@pytest.mark.parametrize("n_chunks,batch", [(1, 2), (2, 3), (1, 4), (3, 2)])
def test_matches_concatenation_formulation(norm, n_chunks, batch):
    x = torch.randn(n_chunks * batch, 8, 5, 6) * torch.rand(n_chunks * batch, 1, 1, 1) * 4
    shared = ReferenceSharedGroupNorm(norm)
    with norm_sharing(n_chunks):
        out = shared(x)
    assert (out - slow_shared(norm, x, n_chunks)).abs().max() <= 1e-5
    refs = x.view(n_chunks, batch, *x.shape[1:])[:, 0]
    assert torch.equal(out.view(n_chunks, batch, *x.shape[1:])[:, 0], norm(refs))


def test_outside_scope_or_single_image_is_plain_group_norm(norm):
    x = torch.randn(4, 8, 5, 6)
    shared = ReferenceSharedGroupNorm(norm)
    assert torch.equal(shared(x), norm(x))
    with norm_sharing(None):
        assert torch.equal(shared(x), norm(x))
    with norm_sharing(4):
        assert torch.equal(shared(x), norm(x))


def test_shares_the_original_parameters(norm):
    shared = ReferenceSharedGroupNorm(norm)
    assert shared.weight is norm.weight and shared.bias is norm.bias
    assert set(dict(shared.named_parameters())) == {"weight", "bias"}

"""attention.low_rank: the trained change B·A of a frozen projection, against explicit loops."""
import pytest
import torch

from personalization_nodes.attention.low_rank import LowRankChange

IN, OUT, RANK = 6, 5, 2


def change_by_loops(down, up, x):
    """Σ_r up[o, r] · Σ_i down[r, i] · x[..., i], one output element at a time."""
    flat, down, up = x.reshape(-1, x.shape[-1]), down.detach(), up.detach()
    out = torch.zeros(flat.shape[0], up.shape[0], dtype=torch.float64)
    for n in range(flat.shape[0]):
        for o in range(up.shape[0]):
            for r in range(down.shape[0]):
                inner = sum(float(down[r, i]) * float(flat[n, i]) for i in range(down.shape[1]))
                out[n, o] += float(up[o, r]) * inner
    return out.reshape(*x.shape[:-1], up.shape[0])


def test_starts_as_no_change_bit_for_bit():
    torch.manual_seed(0)
    change = LowRankChange(IN, OUT, RANK)
    x, base = torch.randn(3, 4, IN), torch.randn(3, 4, OUT)
    assert change.rank == RANK and change.in_features == IN and change.out_features == OUT
    assert torch.equal(change.added_to(base, x), base)
    assert torch.equal(change.weight_change(), torch.zeros(OUT, IN))
    assert change.down.abs().max() > 0  # A is random, so B's gradient is not zero at the start


def test_change_matches_explicit_sum_and_trains():
    torch.manual_seed(1)
    change = LowRankChange(IN, OUT, RANK)
    with torch.no_grad():
        change.up.normal_()
    x = torch.randn(2, 3, IN)
    expected = change_by_loops(change.down, change.up, x)
    assert torch.allclose(change(x).double(), expected, atol=1e-5)
    up, down = change.up.detach(), change.down.detach()
    dense = torch.tensor([[sum(float(up[o, r]) * float(down[r, i]) for r in range(RANK))
                           for i in range(IN)] for o in range(OUT)])
    assert torch.allclose(change.weight_change(), dense, atol=1e-6)
    assert change(x.half()).dtype == torch.float16


def test_first_gradient_reaches_up_only():
    torch.manual_seed(2)
    change = LowRankChange(IN, OUT, RANK)
    (change.added_to(torch.randn(4, OUT), torch.randn(4, IN)) ** 2).sum().backward()
    assert change.up.grad.abs().max() > 0
    assert torch.equal(change.down.grad, torch.zeros_like(change.down))  # B = 0 blocks A's gradient at step 0


def test_state_round_trip_reads_rank_from_shapes():
    torch.manual_seed(3)
    change = LowRankChange(IN, OUT, 3)
    with torch.no_grad():
        change.up.normal_()
    again = LowRankChange.from_state(change.state_dict())
    assert again.rank == 3 and set(change.state_dict()) == {"down", "up"}
    x = torch.randn(2, IN)
    assert torch.equal(again(x), change(x))
    with pytest.raises(ValueError, match="not a low-rank change"):
        LowRankChange.from_state({"down": torch.zeros(3, IN), "up": torch.zeros(OUT, 2)})
    with pytest.raises(ValueError, match="rank >= 1"):
        LowRankChange(IN, OUT, 0)

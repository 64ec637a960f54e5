"""Base-weight quantization for QPaCA (reference/quantize.py): the NF4 table, nearest-level rounding, the
packing layout and the documented error bounds of int8 and NF4."""

import pytest
import torch

from mmkernels.reference import quantize as qz


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    """Rebuild the table from its definition: N(0,1) quantiles at 8 positive and 7 negative equally spaced
    probabilities in [0.5, 0.9677083], plus an exact zero, scaled so the largest is 1."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    levels = levels / levels.max()
    torch.testing.assert_close(torch.tensor(qz.NF4_LEVELS, dtype=torch.float64), levels, rtol=0, atol=2e-7)


# Blocks span rows where the block does not divide a row (48 of 64, 100 of 128); 7 x 10 = 70 elements end in
# a partial block of 6 (zero-padded), 5 x 9 = 45 in one of 1 (and an odd count of codes).
@pytest.mark.parametrize("shape,block", [((72, 48), 64), ((5, 6), 2), ((256, 100), 128), ((7, 10), 16),
                                         ((5, 9), 4)])
def test_nf4_nearest_level_packing_and_bound(shape, block):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.02
    w.view(-1)[:block] = 0.0  # an all-zero block dequantizes to zeros
    packed, absmax = qz.quantize_nf4(w, block)
    blocks = -(-w.numel() // block)
    assert qz.nf4_blocks(w.numel(), block) == blocks
    assert packed.dtype == torch.uint8 and packed.numel() == blocks * block // 2 and absmax.numel() == blocks
    padded = torch.nn.functional.pad(w.reshape(-1), (0, blocks * block - w.numel()))
    amax = padded.reshape(blocks, block).abs().amax(dim=1)  # the padding (zeros) never raises a block's absmax
    assert torch.equal(absmax, torch.where(amax > 0, amax, torch.ones(blocks)))
    levels = torch.tensor(qz.NF4_LEVELS)
    normed = (padded.reshape(-1, block) / absmax[:, None]).reshape(-1)
    nearest = (normed[:, None] - levels[None, :]).abs().argmin(dim=1)
    idx = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1).long()  # low nibble first
    assert torch.all(levels[idx[w.numel():]] == 0)  # the padding holds zero's code
    dist = (normed - levels[idx]).abs()
    assert torch.all(dist <= (normed - levels[nearest]).abs() + 1e-7)  # nearest (ties either way)
    restored = qz.dequantize_nf4(packed, absmax, shape, block)
    assert restored.shape == shape
    bound = (absmax * qz.NF4_MAX_GAP / 2).repeat_interleave(block)[:w.numel()].reshape(shape)
    assert torch.all((restored - w).abs() <= bound * (1 + 1e-6))
    assert torch.equal(restored.view(-1)[:block], torch.zeros(block))
    # Quantizing what NF4 produced gives it back exactly.
    again = qz.quantize_nf4(restored, block)
    assert torch.equal(again[0], packed)


def test_int8_bound_and_zero_rows():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(33, 70, generator=gen)
    w[3] = 0.0
    q, scale = qz.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (33,)
    restored = qz.dequantize_int8(q, scale)
    assert torch.all((restored - w).abs() <= scale[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(restored[3], torch.zeros(70))
    assert q.abs().max() == 127


def test_bad_input():
    with pytest.raises(ValueError, match="block: expected an even block size"):
        qz.quantize_nf4(torch.randn(8), 3)


def test_int8_all_zero_row_gets_scale_one():
    """An all-zero row has scale 1 and codes 0 (as documented), not a zero scale that divides 0 by 0."""
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    w[1] = 0.0
    q, scale = qz.quantize_int8(w)
    assert scale[1].item() == 1.0 and torch.equal(q[1], torch.zeros(8, dtype=torch.int8))
    assert torch.equal(qz.dequantize_int8(q, scale)[1], torch.zeros(8))
    torch.testing.assert_close(scale[[0, 2]], w[[0, 2]].abs().amax(1) / 127, rtol=0, atol=0)

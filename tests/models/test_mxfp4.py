"""MXFP4 dequantization against transformers' own `convert_moe_packed_tensors` on random blocks and scales."""

import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from jsft.models import mxfp4


def _packed(e=3, out=6, groups=2, seed=0):
    rs = np.random.RandomState(seed)
    blocks = rs.randint(0, 256, (e, out, groups, 16)).astype(np.uint8)
    scales = rs.randint(118, 136, (e, out, groups)).astype(np.uint8)  # 2^-9 .. 2^8 around the bias 127
    return blocks, scales


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_equals_transformers(dtype):
    blocks, scales = _packed()
    expected = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=getattr(torch, dtype))
    got = mxfp4.dequantize(blocks, scales)
    assert got.shape == tuple(expected.shape) == (3, 64, 6)  # [E, in = G*32, out]
    np.testing.assert_array_equal(got, expected.float().numpy())  # exact: fp4 * 2^k is representable in both


def test_nibble_order_and_scale_bias():
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x2F  # low nibble 0xF (-6.0) is element 0, high nibble 0x2 (+1.0) element 1
    scales = np.full((1, 1, 1), 128, np.uint8)  # 2^(128-127) = 2
    got = mxfp4.dequantize(blocks, scales)[0, :, 0]
    assert got[0] == -12.0 and got[1] == 2.0 and not got[2:].any()


def test_checkpoint_pairs_are_dequantized_and_lone_halves_refused():
    blocks, scales = _packed(e=2, out=4, groups=1)
    bias = np.ones((2, 4), np.float32)
    out = mxfp4.dequantize_checkpoint_tensors({
        "model.layers.0.mlp.experts.down_proj_blocks": blocks, "model.layers.0.mlp.experts.down_proj_scales": scales,
        "model.layers.0.mlp.experts.down_proj_bias": bias,
    })
    assert sorted(out) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.down_proj_bias"]
    assert out["model.layers.0.mlp.experts.down_proj"].shape == (2, 32, 4)
    with pytest.raises(ValueError, match="down_proj_scales is missing"):
        mxfp4.dequantize_checkpoint_tensors({"x.down_proj_blocks": blocks})


@pytest.mark.parametrize("index", [
    (slice(None), slice(None), slice(None)),
    (slice(1, 3), slice(8, 16), slice(2, 5)),  # part of one 32-value block of the input axis
    (slice(0, 1), slice(20, 50), slice(None)),  # across a block boundary
    (slice(None), slice(0, 64, 3), slice(0, 6, 2)),  # strided
])
def test_mxfp4_tensor_slices_equal_the_whole_dequantized_tensor(index):
    """Import reads a device's slice through Mxfp4Tensor, which dequantizes only the blocks it covers."""
    blocks, scales = _packed()
    view = mxfp4.Mxfp4Tensor(blocks, scales)
    whole = mxfp4.dequantize(blocks, scales)
    assert view.shape == whole.shape == (3, 64, 6)
    np.testing.assert_array_equal(view[index], whole[index])
    with pytest.raises(ValueError, match="not a uint8 blocks/scales pair"):
        mxfp4.Mxfp4Tensor(blocks, scales[..., :1], "experts.down_proj")

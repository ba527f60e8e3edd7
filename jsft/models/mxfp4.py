"""MXFP4 dequantization of gpt-oss' expert tensors, as transformers' `convert_moe_packed_tensors`.

The released gpt-oss checkpoints store each expert projection as
  `<name>_blocks` uint8 [E, out, G, 16]: 32 fp4 (e2m1) values per block of the input dim, two per byte, the
                  low nibble first;
  `<name>_scales` uint8 [E, out, G]: one e8m0 exponent per block, bias 127 (value = fp4 * 2^(scale - 127)).
Dequantized, a block row becomes [E, out, G*32] and is transposed to transformers' [E, in, out] layout
(`gate_up_proj` [E, D, 2F] with gate/up interleaved, `down_proj` [E, F, D]).

Import (jsft/models/hf_io.py) reads such a pair through `Mxfp4Tensor`, a dequantized view that slices like the
memory-mapped tensor it replaces and reads only the blocks a device's slice needs.
"""

from __future__ import annotations

import numpy as np

# e2m1: sign bit, 2 exponent bits, 1 mantissa bit, indexed by the nibble
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """blocks uint8 [*prefix, out, G, B] and scales uint8 [*prefix, out, G] -> [*prefix, G*B*2, out] in `dtype`
    (every fp4 value times a power of two is exact in fp32 and bf16)."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4: blocks {blocks.shape} do not match scales {scales.shape} (blocks[:-1] == scales)")
    values = np.empty((*blocks.shape, 2), np.float32)
    values[..., 0] = FP4_VALUES[blocks & 0x0F]
    values[..., 1] = FP4_VALUES[blocks >> 4]
    exponents = scales.astype(np.int32) - 127
    out = np.ldexp(values, exponents[..., None, None])  # [*prefix, out, G, B, 2]
    out = out.reshape(*blocks.shape[:-2], -1)  # [*prefix, out, in]
    return np.swapaxes(out, -1, -2).astype(dtype)


class Mxfp4Tensor:
    """The dequantized [*prefix, in, out] view of one blocks/scales pair (memory-mapped or in memory). Indexing
    with slices reads the blocks of the requested rows (`out`) and block columns (`in`) only, dequantizes them
    in fp32 and cuts the requested range."""

    def __init__(self, blocks: np.ndarray, scales: np.ndarray, name: str = "tensor"):
        if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"MXFP4 {name}: {name}_blocks {blocks.dtype}{list(blocks.shape)} and {name}_scales "
                             f"{scales.dtype}{list(scales.shape)} are not a uint8 blocks/scales pair "
                             "(blocks.shape[:-1] == scales.shape)")
        self.blocks, self.scales, self.name = blocks, scales, name
        self.values_per_block = 2 * blocks.shape[-1]  # two fp4 values per byte
        *prefix, out, groups, _ = blocks.shape
        self.shape = (*prefix, groups * self.values_per_block, out)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = (*index, *(slice(None),) * (len(self.shape) - len(index)))
        *lead, inner, outer = index
        start, stop, step = inner.indices(self.shape[-2])
        b = self.values_per_block
        if step == 1 and stop > start:  # the blocks covering [start, stop) of the input dimension
            first, last = start // b, -(-stop // b)
            inner = slice(start - first * b, stop - first * b)
        else:
            first, last = 0, self.shape[-2] // b
        where = (*lead, outer, slice(first, last))
        return dequantize(np.asarray(self.blocks[where]), np.asarray(self.scales[where]))[..., inner, :]


def dequantize_checkpoint_tensors(tensors: dict, dtype=np.float32) -> dict:
    """Replace every `<name>_blocks` / `<name>_scales` pair in a name -> array dict by `<name>` dequantized;
    other tensors pass through. A lone half of a pair is an error naming it."""
    out, pairs = {}, {}
    for name, value in tensors.items():
        for suffix in ("_blocks", "_scales"):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = value
                break
        else:
            out[name] = value
    for base, pair in pairs.items():
        if len(pair) != 2:
            missing = "_scales" if "_blocks" in pair else "_blocks"
            raise ValueError(f"MXFP4: {base}{missing} is missing from the checkpoint (its pair is present)")
        out[base] = dequantize(pair["_blocks"], pair["_scales"], dtype)
    return out

"""Hugging Face safetensors <-> jsft parameters, driven by ONE key table read both ways.

Import streams: every jsft parameter is created with `jax.make_array_from_callback`, whose callback reads
from the memory-mapped safetensors file only the slice that one device holds. Peak host memory therefore
stays near one tensor slice, and each host reads only what its devices own. Export walks the same table
backwards and streams: a stacked `[layers, ...]` parameter is gathered one layer's slice at a time (and an
unstacked one in row blocks no larger than that), so the extra device memory stays near one layer's largest
tensor instead of a whole stacked parameter replicated on every device; shards are written as they fill.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import jax
import ml_dtypes
import numpy as np

from jsft.models.config import GEMMA, ModelConfig
from jsft.models.mxfp4 import Mxfp4Tensor

# ---- the key table ------------------------------------------------------------------------------------------
# One row per tensor: jsft path, HF name ("{i}" marks per-layer tensors, which jsft stacks on a leading
# `layers` axis), the HF shape of one tensor, and its layout:
#   "linear": torch Linear weights are [out, in]; jsft keeps [in, out] split into named axes (q_proj
#             [D, N, H], o_proj [N, H, D]), so jsft = hf.T.reshape(jsft shape) and hf = jsft.reshape(hf.T shape).T
#   "same":   identical up to a reshape (q_bias [N*H] <-> [N, H]).
#   "interleaved": gpt-oss' fused gate/up: HF [..., 2F] holds gate at even and up at odd positions of its last
#             axis (transformers' `gate_up[..., ::2]`, `[..., 1::2]`); jsft keeps [..., 2, F] (gate [..., 0, :]).
# Mixtures of experts: an HF tensor per expert ("{e}" in its name) stacks on a leading experts axis after
# the layers axis (jsft [layers, E, ...]); `layers` lists the HF layers a stack holds (a Qwen3-MoE's dense
# and sparse MLPs stack over their own layers); `part` = (axis, index): the HF tensor is that slice of the
# per-expert jsft tensor (gate and up are the two halves of jsft's fused gate_up_proj [D, 2, F]).
# gpt-oss stores each layer's experts as one tensor (experts=0: the experts axis is part of the HF shape);
# `mxfp4`: the checkpoint stores that tensor as MXFP4 `<hf>_blocks` + `<hf>_scales` (jsft/models/mxfp4.py),
# dequantized on import; `hf_shape` is the dequantized one. Exports never quantize (hf_export drops it).


@dataclass(frozen=True)
class Key:
    jsft: str
    hf: str
    hf_shape: tuple[int, ...]
    layout: str  # "linear" | "same"
    layers: Optional[tuple[int, ...]] = None  # the HF layers stacked in jsft's layers axis (None: all)
    experts: int = 0  # > 0: one HF tensor per expert, stacked on jsft's axis 1
    part: Optional[tuple[int, int]] = None  # (axis, index) of the per-expert jsft tensor this HF tensor fills
    mxfp4: bool = False  # stored as MXFP4 blocks + scales

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else self.layers

    def name(self, layer: int = 0, expert: int = 0) -> str:
        return self.hf.format(i=layer, e=expert)


def key_table(cfg: ModelConfig, prefix: str = "model.") -> list[Key]:
    """`prefix`: where the decoder's tensors live ("model." in a causal LM; the text stack of a multimodal
    gemma3 checkpoint sits under "language_model.model." (Hub layout) or "model.language_model.")."""
    d, v = cfg.hidden_size, cfg.vocab_size
    nh, kh, h = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    p = prefix + "layers.{i}."
    gemma = cfg.model_type in GEMMA
    # Gemma's post_attention_layernorm normalises the attention output; Llama's is the MLP's input norm
    mlp_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    keys = [
        Key("embed", prefix + "embed_tokens.weight", (v, d), "same"),
        Key("layers/attn_norm", p + "input_layernorm.weight", (d,), "same"),
        Key("layers/q_proj", p + "self_attn.q_proj.weight", (nh, d), "linear"),
        Key("layers/k_proj", p + "self_attn.k_proj.weight", (kh, d), "linear"),
        Key("layers/v_proj", p + "self_attn.v_proj.weight", (kh, d), "linear"),
        Key("layers/o_proj", p + "self_attn.o_proj.weight", (d, nh), "linear"),
        Key("layers/mlp_norm", p + mlp_norm + ".weight", (d,), "same"),
        Key("final_norm", prefix + "norm.weight", (d,), "same"),
    ]
    if cfg.qkv_bias:
        keys += [
            Key("layers/q_bias", p + "self_attn.q_proj.bias", (nh,), "same"),
            Key("layers/k_bias", p + "self_attn.k_proj.bias", (kh,), "same"),
            Key("layers/v_bias", p + "self_attn.v_proj.bias", (kh,), "same"),
        ]
    if cfg.o_bias:
        keys.append(Key("layers/o_bias", p + "self_attn.o_proj.bias", (d,), "same"))
    if cfg.qk_norm:
        keys += [Key(f"layers/{x}_norm", p + f"self_attn.{x}_norm.weight", (h,), "same") for x in "qk"]
    if gemma:
        keys += [
            Key("layers/post_attn_norm", p + "post_attention_layernorm.weight", (d,), "same"),
            Key("layers/post_mlp_norm", p + "post_feedforward_layernorm.weight", (d,), "same"),
        ]
    if cfg.attention_sinks:
        keys.append(Key("layers/sinks", p + "self_attn.sinks", (cfg.num_heads,), "same"))
    keys += _mlp_keys(cfg, p)
    if not cfg.tie_word_embeddings:
        keys.append(Key("lm_head", prefix.removesuffix("model.") + "lm_head.weight", (v, d), "linear"))
    return keys


# the experts of each MoE family: (router, per-expert prefix, gate, up, down)
_MOE_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
}


def _mlp_keys(cfg: ModelConfig, p: str) -> list[Key]:
    """The dense MLP over the dense layers, the MoE MLP over the sparse ones (see decoder._mlp_tables)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    sparse = cfg.layer_is_sparse()
    dense_ids = tuple(i for i, s in enumerate(sparse) if not s)
    keys = []
    if dense_ids:
        ids = None if len(dense_ids) == cfg.num_layers else dense_ids
        keys += [
            Key("layers/gate_proj", p + "mlp.gate_proj.weight", (f, d), "linear", ids),
            Key("layers/up_proj", p + "mlp.up_proj.weight", (f, d), "linear", ids),
            Key("layers/down_proj", p + "mlp.down_proj.weight", (d, f), "linear", ids),
        ]
    if cfg.moe is None:
        return keys
    if cfg.model_type == "gpt_oss":
        return keys + _gpt_oss_keys(cfg, p)
    router, expert, gate, up, down = _MOE_NAMES[cfg.model_type]
    e, fe = cfg.moe.num_experts, cfg.moe_intermediate_size
    ids = tuple(i for i, s in enumerate(sparse) if s)
    ids = None if len(ids) == cfg.num_layers else ids
    x = p + expert
    return keys + [
        Key("layers/moe_router", p + router, (e, d), "linear", ids),
        Key("layers/moe_gate_up_proj", x + gate + ".weight", (fe, d), "linear", ids, e, (1, 0)),
        Key("layers/moe_gate_up_proj", x + up + ".weight", (fe, d), "linear", ids, e, (1, 1)),
        Key("layers/moe_down_proj", x + down + ".weight", (d, fe), "linear", ids, e),
    ]


def _gpt_oss_keys(cfg: ModelConfig, p: str) -> list[Key]:
    """gpt-oss (transformers' GptOssMLP): a router Linear with bias, and all experts of a layer fused, in [in, out]
    layout: gate_up_proj [E, D, 2F] (gate/up interleaved) + bias [E, 2F], down_proj [E, F, D] + bias [E, D]."""
    e, d, f = cfg.moe.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    x, q = p + "mlp.experts.", cfg.quantization == "mxfp4"
    return [
        Key("layers/moe_router", p + "mlp.router.weight", (e, d), "linear"),
        Key("layers/moe_router_bias", p + "mlp.router.bias", (e,), "same"),
        Key("layers/moe_gate_up_proj", x + "gate_up_proj", (e, d, 2 * f), "interleaved", mxfp4=q),
        Key("layers/moe_gate_up_bias", x + "gate_up_proj_bias", (e, 2 * f), "interleaved"),
        Key("layers/moe_down_proj", x + "down_proj", (e, f, d), "same", mxfp4=q),
        Key("layers/moe_down_bias", x + "down_proj_bias", (e, d), "same"),
    ]


# where a multimodal gemma3 checkpoint keeps its text stack: the Hub's layout, then transformers 5's module names
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")


def text_prefix(cfg: ModelConfig, available: set[str]) -> str:
    """The prefix of the decoder's tensors in a checkpoint holding `available` (see `key_table`)."""
    if cfg.text_of is None:
        return "model."
    for prefix in _TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in available:
            return prefix
    raise ValueError(f"a {cfg.text_of} checkpoint without its text stack: no {' or '.join(p + 'embed_tokens.weight' for p in _TEXT_PREFIXES)}")


def hf_tensor_names(key: Key, num_layers: int) -> list[str]:
    names = [key.hf] if not key.per_layer else [
        key.name(i, e) for i in key.layer_ids(num_layers) for e in range(max(key.experts, 1))]
    return [n + suffix for n in names for suffix in ("_blocks", "_scales")] if key.mxfp4 else names


def hf_source(key: Key, files: SafetensorsDir, name: str):
    """The (lazy) HF tensor `name` of `key`: a memory-mapped array, or a dequantizing view of an MXFP4 pair."""
    if key.mxfp4:
        return Mxfp4Tensor(files.get(name + "_blocks"), files.get(name + "_scales"), name)
    return files.get(name)


def to_hf_layout(key: Key, x: np.ndarray) -> np.ndarray:
    """One (unstacked) jsft tensor -> its HF tensor."""
    if key.layout == "linear":
        return np.ascontiguousarray(x.reshape(key.hf_shape[::-1]).T)
    if key.layout == "interleaved":  # [..., 2, F] -> [..., F, 2] -> [..., 2F]: gate, up, gate, up, ...
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).reshape(key.hf_shape)
    return x.reshape(key.hf_shape)


def read_hf_slice(key: Key, tensor: np.ndarray, jsft_shape: Sequence[int], index: tuple) -> np.ndarray:
    """jsft[index] for one (unstacked) tensor, reading from the (memory-mapped) HF `tensor` only the rows and
    columns that the slice needs. `jsft_shape` merges group-wise into the HF axes (reversed for "linear")."""
    if tuple(tensor.shape) != key.hf_shape:
        raise ValueError(f"{key.hf}: expected shape {key.hf_shape}, the checkpoint has {tuple(tensor.shape)}")
    if key.layout == "interleaved":
        return _read_interleaved(tensor, jsft_shape, index)
    merged_shape = key.hf_shape[::-1] if key.layout == "linear" else key.hf_shape
    merged_index, block_shape, residual = [], [], []
    for dims in _groups(jsft_shape, merged_shape):
        slices = [index[j].indices(jsft_shape[j]) for j in dims]
        inner = math.prod(jsft_shape[j] for j in dims[1:])
        rest_full = all(sl[:2] == (0, jsft_shape[j]) and sl[2] == 1 for sl, j in zip(slices[1:], dims[1:]))
        start, stop, step = slices[0]
        if rest_full and step == 1:  # contiguous in the merged axis: read only those rows/columns
            merged_index.append(slice(start * inner, stop * inner))
            block_shape += [stop - start] + [jsft_shape[j] for j in dims[1:]]
            residual += [slice(None)] * len(dims)
        else:  # read the whole axis, slice after the reshape
            merged_index.append(slice(None))
            block_shape += [jsft_shape[j] for j in dims]
            residual += [index[j] for j in dims]
    if key.layout == "linear":
        block = np.asarray(tensor[tuple(merged_index[::-1])]).T
    else:
        block = np.asarray(tensor[tuple(merged_index)])
    return block.reshape(block_shape)[tuple(residual)]


def _read_interleaved(tensor, jsft_shape: Sequence[int], index: tuple) -> np.ndarray:
    """jsft[index] of an "interleaved" tensor: jsft [*lead, 2, F] from HF [*lead, 2F]; reads only the lead slices
    and the columns 2f, 2f + 1 of the F slice."""
    *lead, pair, f = index
    start, stop, step = f.indices(jsft_shape[-1])
    columns = slice(2 * start, 2 * stop) if step == 1 else slice(None)
    block = np.asarray(tensor[(*lead, columns)])  # [*lead', 2F']
    block = np.swapaxes(block.reshape(*block.shape[:-1], -1, 2), -1, -2)  # [*lead', 2, F']
    return block[..., pair, slice(None) if step == 1 else f]


def _groups(shape: Sequence[int], merged_shape: Sequence[int]) -> list[list[int]]:
    """Which consecutive dims of `shape` merge into each dim of `merged_shape` (products must match)."""
    groups, j = [], 0
    for size in merged_shape:
        dims, prod = [], 1
        while not dims or prod < size:
            dims.append(j)
            prod *= shape[j]
            j += 1
        if prod != size:
            raise ValueError(f"shape {tuple(shape)} does not merge into {tuple(merged_shape)}")
        groups.append(dims)
    groups[-1] += list(range(j, len(shape)))  # trailing size-1 dims
    return groups


# ---- memory-mapped safetensors ----------------------------------------------------------------------------------
# safetensors' numpy backend cannot return bfloat16, so the (simple, documented) file layout is mapped here
# directly: an 8-byte header length, a JSON header, then raw little-endian tensors. Slicing a memmap reads
# only the pages that the slice touches.

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsDir:
    """All tensors of an HF checkpoint directory (one file or sharded with model.safetensors.index.json)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in self.files:
            header, data_start = _read_header(file)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (file, info, data_start)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str):
        return np.dtype(_DTYPES[self._where[name][1]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        """A lazy view of one tensor; slice it to read part of it. Each call maps the file afresh and the
        mapping goes away with the view, so pages read for one tensor do not stay in the process's RSS."""
        file, info, data_start = self._where[name]
        begin = info["data_offsets"][0]
        shape = tuple(info["shape"])
        if not shape or 0 in shape:
            return np.zeros(shape, _DTYPES[info["dtype"]])
        return np.memmap(file, dtype=_DTYPES[info["dtype"]], mode="r", offset=data_start + begin, shape=shape)


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); jsft loads safetensors only "
            "(pickles can run arbitrary code). Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise FileNotFoundError(f"no *.safetensors files in {path}")


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


# ---- import -----------------------------------------------------------------------------------------------------

# buffers that old checkpoints carry but that are recomputed from the config
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def check_names(cfg: ModelConfig, available: set[str], path, prefix: str = "model.") -> None:
    expected = {n for k in key_table(cfg, prefix) for n in hf_tensor_names(k, cfg.num_layers)}
    missing = sorted(expected - available)
    extra = {n for n in available - expected if not _IGNORED.match(n)}
    if cfg.tie_word_embeddings:  # some tied checkpoints store the copy; the embedding is used
        extra -= {"lm_head.weight", "language_model.lm_head.weight"}
    if cfg.text_of is not None:  # the multimodal checkpoint's vision tower and projector are not loaded
        extra = {n for n in extra if n.startswith(prefix)}
    if missing or extra:
        raise ValueError(
            f"{path}: checkpoint tensors do not match the {cfg.model_type} config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {sorted(extra)[:5]}"
        )


def load_array(key: Key | Sequence[Key], files: SafetensorsDir, shape, sharding, dtype, num_layers: int) -> jax.Array:
    """One jsft parameter (its key, or the keys of its parts) as a sharded jax.Array; each device's callback
    reads only its own slice."""
    parts = [key] if isinstance(key, Key) else list(key)
    key = parts[0]

    def tensor(name, shape, index, part_key):
        """One unstacked jsft tensor's slice, assembled from its parts where it has several."""
        if part_key.part is None:
            return read_hf_slice(part_key, hf_source(part_key, files, name(part_key)), shape, index)
        axis = part_key.part[0]
        inner, inner_index = (*shape[:axis], *shape[axis + 1:]), (*index[:axis], *index[axis + 1:])
        chosen = range(shape[axis])[index[axis]]
        by_index = {k.part[1]: k for k in parts}
        return np.stack([read_hf_slice(k, hf_source(k, files, name(k)), inner, inner_index)
                         for k in (by_index[j] for j in chosen)], axis=axis)

    def shard(index: tuple) -> np.ndarray:
        if not key.per_layer:
            return tensor(lambda k: k.hf, shape, index, key).astype(dtype)
        layers = key.layer_ids(num_layers)[index[0]]
        if not key.experts:
            per = [tensor(lambda k, i=i: k.name(i), shape[1:], index[1:], key) for i in layers]
        else:
            experts = range(key.experts)[index[1]]
            per = [np.stack([tensor(lambda k, i=i, e=e: k.name(i, e), shape[2:], index[2:], key) for e in experts])
                   for i in layers]
        return np.stack(per).astype(dtype)

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def keys_by_param(keys: Sequence[Key]) -> dict[str, list[Key]]:
    """jsft name -> its keys (several where HF tensors are parts of one jsft parameter)."""
    out: dict[str, list[Key]] = {}
    for k in keys:
        out.setdefault(k.jsft, []).append(k)
    return out


# ---- export -----------------------------------------------------------------------------------------------------


def hf_tensors(cfg: ModelConfig, params: dict[str, jax.Array], dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) in table order, gathering one layer (or block) at a time onto this host.
    Every process must iterate it to the end together (the gathers are collectives across processes)."""
    limit = gather_limit_bytes(cfg, params)
    for key in key_table(cfg):
        x = params[key.jsft]
        if key.per_layer:
            for j, i in enumerate(key.layer_ids(cfg.num_layers)):
                layer = gather_layer(x, j).astype(dtype)  # one layer (all its experts) at a time
                if not key.experts:
                    yield key.name(i), to_hf_layout(key, layer)
                    continue
                for e in range(key.experts):
                    part = layer[e] if key.part is None else np.take(layer[e], key.part[1], axis=key.part[0])
                    yield key.name(i, e), to_hf_layout(key, part)
        else:
            yield key.hf, to_hf_layout(key, gather_whole(x, limit).astype(dtype))


def gather_limit_bytes(cfg: ModelConfig, params: dict[str, jax.Array]) -> int:
    """The largest per-layer tensor (bytes): the block size for gathering unstacked tensors."""
    sizes = [math.prod(params[k.jsft].shape[1:]) * params[k.jsft].dtype.itemsize for k in key_table(cfg) if k.per_layer]
    return max(sizes, default=1)


def gather_layer(x: jax.Array, i: int, across_processes: Optional[bool] = None) -> np.ndarray:
    """x[i] of a stacked parameter on this host; the devices hold at most one layer's tensor extra."""
    if across_processes is None:
        across_processes = not x.is_fully_addressable
    return _to_host(_gather_program(x.sharding, x.ndim, not across_processes, ("layer",)), x, i)


def gather_whole(x: jax.Array, limit_bytes: int, across_processes: Optional[bool] = None) -> np.ndarray:
    """The whole of x on this host. One host owning every device copies the shards straight over; across
    processes x moves in blocks of at most `limit_bytes`, cut along a dimension that is not sharded (a
    block of a sharded dimension would make XLA gather the whole tensor first)."""
    if across_processes is None:
        across_processes = not x.is_fully_addressable
    if not across_processes:
        return np.asarray(jax.device_get(x))
    what = block_plan(x, limit_bytes)
    program = _gather_program(x.sharding, x.ndim, False, what)
    if what[0] == "whole":
        return _to_host(program, x, 0)
    _, axis, block = what
    size = x.shape[axis]
    # dynamic_slice clamps a start past size - block back to it: the last block overlaps its neighbour
    blocks = []
    for start in range(0, size, block):
        part = _to_host(program, x, start)
        blocks.append(np.take(part, range(start - min(start, size - block), block), axis=axis))
    return np.concatenate(blocks, axis=axis)


def block_plan(x, limit_bytes: int) -> tuple:
    """("whole",) or ("block", axis, size): how `gather_whole` moves x (an array or ShapeDtypeStruct)."""
    axis = _unsharded_axis(x)
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    if axis is None or nbytes <= limit_bytes:
        return ("whole",)
    size = x.shape[axis]
    return ("block", axis, max(1, min(size, limit_bytes * size // nbytes)))


def _unsharded_axis(x) -> Optional[int]:
    spec = _spec(x.sharding, x.ndim)
    free = [d for d in range(x.ndim) if spec[d] is None and x.shape[d] > 1]
    return max(free, key=lambda d: x.shape[d]) if free else None


def _spec(sharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else ()
    return spec + (None,) * (ndim - len(spec))


class _Gather(NamedTuple):
    program: Callable  # jitted (x, index) -> the part, its axes permuted by `perm`
    perm: tuple[int, ...]


@functools.lru_cache(maxsize=None)
def _gather_program(sharding, ndim: int, addressable: bool, what: tuple) -> _Gather:
    """The program taking (x, index) to layer `index` (("layer",)), x itself (("whole",)) or the block
    [index, index + size) of dimension `axis` (("block", axis, size)). On one host owning every device the
    output keeps x's sharding and the host reads the shards; across processes it is replicated, which is
    what lets process 0 read all of it (one layer or block per device). The replicated output puts its
    sharded dimensions first: gathering a minor dimension would need a full-size transposed copy."""
    if what[0] == "layer":
        take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)  # noqa: E731
    elif what[0] == "whole":
        take = lambda x, i: x  # noqa: E731
    else:
        take = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, what[2], what[1])  # noqa: E731
    if addressable or not isinstance(sharding, jax.sharding.NamedSharding):
        return _Gather(jax.jit(take), ())
    spec = _spec(sharding, ndim)[1 if what[0] == "layer" else 0 :]  # the output's
    perm = tuple(d for d in range(len(spec)) if spec[d] is not None) + tuple(d for d in range(len(spec)) if spec[d] is None)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return _Gather(jax.jit(lambda x, i: jax.numpy.transpose(take(x, i), perm), out_shardings=replicated), perm)


def _to_host(gather: _Gather, x: jax.Array, index: int) -> np.ndarray:
    y = gather.program(x, index)
    host = np.asarray(jax.device_get(y) if y.is_fully_addressable else y.addressable_data(0))
    return np.transpose(host, np.argsort(gather.perm)) if gather.perm else host


def shard_plan(cfg: ModelConfig, dtype, max_shard_size) -> tuple[dict[str, str], bool]:
    """HF tensor name -> file name, splitting by size the way transformers does."""
    from huggingface_hub import split_state_dict_into_shards_factory

    itemsize = np.dtype(dtype).itemsize
    sizes = {}
    for key in key_table(cfg):
        for name in hf_tensor_names(key, cfg.num_layers):
            sizes[name] = math.prod(key.hf_shape) * itemsize
    split = split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda n: n, get_storage_id=lambda n: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
    )
    return split.tensor_to_filename, split.is_sharded


def gather_device_bytes(x: jax.ShapeDtypeStruct, what=("layer",), *, across_processes: bool = True) -> int:
    """Per-device bytes (outputs + temporaries, XLA's memory analysis) that the export's gather program
    for a parameter of this shape and sharding allocates beyond its input: `what` as in `_gather_program`.
    Compiles on abstract shapes, so real model sizes cost nothing to measure."""
    program = _gather_program(x.sharding, len(x.shape), not across_processes, what).program
    analysis = program.lower(x, 0).compile().memory_analysis()
    return int(analysis.output_size_in_bytes + analysis.temp_size_in_bytes)

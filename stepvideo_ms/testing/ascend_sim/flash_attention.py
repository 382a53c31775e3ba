"""Emulator of `ops.flash_attention_score` (MindSpore 2.10), checked against its docstring.

Enforced: query/key/value float16 or bfloat16 of one dtype; `input_layout` one of BSH, BNSD, SBH,
BSND (TND refused) and shapes that fit it; `head_num` equal to the query's heads and a multiple of
the key heads; head_dim a multiple of 16, at most 512; `attn_mask` bool or uint8 with 1 = discard,
shaped (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) for sparse_mode 0/1 and exactly the 2048x2048
compressed causal mask for sparse_mode 2/3; `real_shift` of the query's dtype shaped (B, N1, S1, S2)
or (1, N1, S1, S2). Computed in float32 (scores, bias, softmax, weighted sum), rounded to the
query's dtype; the softmax probabilities are rounded to the input dtype before they multiply the
values, as the cube unit takes float16/bfloat16 operands (and upstream's CPU kernel does too). A query row whose keys are all discarded is refused: the kernel's output there is
not softmax of anything.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from .patching import bind

LAYOUTS = ("BSH", "BNSD", "SBH", "BSND", "TND")
COMPRESSED = 2048
INT_MAX = 2147483647
# query rows per block so that one float32 score block stays below this many bytes
_MAX_SCORE_BYTES = 64 * 1024 * 1024


def compressed_causal_mask() -> np.ndarray:
    """The documented (2048, 2048) mask of sparse_mode 2/3: 1 (discard) strictly above the diagonal."""
    return np.triu(np.ones((COMPRESSED, COMPRESSED), dtype=np.uint8), k=1)


def _to_bnsd(x: Tensor, layout: str, heads: int, name: str) -> Tensor:
    """(B, N, S, D) view of q/k/v in `layout`; `heads` is used for the H-layouts."""
    if layout == "BNSD":
        if x.ndim != 4:
            raise RuntimeError(f"flash_attention_score: {name} must be (B, N, S, D) for BNSD, got {tuple(x.shape)}")
        return x
    if layout == "BSND":
        if x.ndim != 4:
            raise RuntimeError(f"flash_attention_score: {name} must be (B, S, N, D) for BSND, got {tuple(x.shape)}")
        return mint.permute(x, (0, 2, 1, 3))
    if x.ndim != 3:
        raise RuntimeError(f"flash_attention_score: {name} must be 3-D for {layout}, got {tuple(x.shape)}")
    if layout == "SBH":
        x = mint.permute(x, (1, 0, 2))
    b, s, h = x.shape
    if h % heads:
        raise RuntimeError(f"flash_attention_score: hidden size {h} of {name} is not a multiple of its {heads} heads")
    return mint.permute(x.reshape(b, s, heads, h // heads), (0, 2, 1, 3))


def _from_bnsd(out: Tensor, layout: str) -> Tensor:
    if layout == "BNSD":
        return out
    bsnd = mint.permute(out, (0, 2, 1, 3))
    if layout == "BSND":
        return bsnd
    b, s, n, d = bsnd.shape
    bsh = bsnd.reshape(b, s, n * d)
    return mint.permute(bsh, (1, 0, 2)) if layout == "SBH" else bsh


def _keep_matrix(a, b, n1, s1, s2) -> np.ndarray:
    """bool keep[(B or 1), (N1 or 1), S1, S2] from attn_mask, sparse_mode and the token band."""
    mode, mask = a["sparse_mode"], a["attn_mask"]
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"flash_attention_score: 'sparse_mode' must be an int, got {mode!r}")
    if mode not in range(9) or mode >= 6:
        raise RuntimeError(f"flash_attention_score: sparse_mode={mode} is invalid (0-5; 6-8 are not implemented)")
    if mode in (4, 5):
        raise NotImplementedError(f"the simulation does not emulate sparse_mode={mode} (band / prefix)")
    keep = np.ones((1, 1, s1, s2), dtype=bool)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"flash_attention_score: 'attn_mask' must be a Tensor, got {type(mask).__name__}")
        if mask.dtype not in (ms.bool_, ms.uint8):
            raise TypeError(f"flash_attention_score: 'attn_mask' must be bool or uint8 (1 = discard), got {mask.dtype}")
    if mode in (2, 3):
        if mask is None or tuple(mask.shape) != (COMPRESSED, COMPRESSED):
            shape = None if mask is None else tuple(mask.shape)
            raise RuntimeError(f"flash_attention_score: sparse_mode={mode} needs the compressed ({COMPRESSED}, "
                               f"{COMPRESSED}) causal attn_mask, got {shape}")
        if not np.array_equal(mask.asnumpy().astype(np.uint8), compressed_causal_mask()):
            raise ValueError(f"flash_attention_score: the sparse_mode={mode} attn_mask must be the lower-triangle "
                             f"compression mask (1 strictly above the diagonal)")
        offset = 0 if mode == 2 else s2 - s1  # leftUpCausal / rightDownCausal
        rows, cols = np.arange(s1)[:, None], np.arange(s2)[None, :]
        return (cols <= rows + offset)[None, None]
    if mask is not None:
        shape = tuple(mask.shape)
        if shape not in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)):
            raise RuntimeError(f"flash_attention_score: attn_mask{shape} is not valid for sparse_mode={mode}: use "
                               f"({b}, {n1}, {s1}, {s2}), ({b}, 1, {s1}, {s2}) or ({s1}, {s2})")
        drop = mask.asnumpy().astype(bool)
        keep = ~(drop.reshape(1, 1, s1, s2) if drop.ndim == 2 else drop)
    if mode == 0:
        pre, nxt = a["pre_tokens"], a["next_tokens"]
        if (pre, nxt) != (INT_MAX, INT_MAX):
            rows, cols = np.arange(s1)[:, None], np.arange(s2)[None, :]
            keep = keep & ((cols - rows <= nxt) & (rows - cols <= pre))[None, None]
    return keep


def emulator(real):
    def flash_attention_score(*args, **kwargs):
        a = bind(real, "ops.flash_attention_score", args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        for name, t in (("query", q), ("key", k), ("value", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"flash_attention_score: '{name}' must be a Tensor, got {type(t).__name__}")
        if q.dtype not in (ms.float16, ms.bfloat16):
            raise TypeError(f"flash_attention_score: query must be float16 or bfloat16, got {q.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"flash_attention_score: query, key and value must share a dtype, got "
                            f"{q.dtype}, {k.dtype}, {v.dtype}")
        layout = a["input_layout"]
        if not isinstance(layout, str):
            raise TypeError(f"flash_attention_score: 'input_layout' must be a string, got {layout!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"flash_attention_score: input_layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        if layout == "TND":
            raise NotImplementedError("the simulation does not emulate the TND layout")
        heads = a["head_num"]
        if not isinstance(heads, int) or heads <= 0:
            raise RuntimeError(f"flash_attention_score: head_num must be a positive int, got {heads!r}")
        for name in ("scalar_value", "keep_prob"):
            if not isinstance(a[name], (float, int)) or isinstance(a[name], bool):
                raise TypeError(f"flash_attention_score: '{name}' must be a float, got {a[name]!r}")
        if a["keep_prob"] != 1.0 or a["drop_mask"] is not None:
            raise NotImplementedError("the simulation does not emulate dropout (keep_prob must be 1.0, drop_mask None)")
        if a["padding_mask"] is not None:
            raise RuntimeError("flash_attention_score: padding_mask is reserved and not implemented")
        if a["prefix"] is not None or a["actual_seq_qlen"] is not None or a["actual_seq_kvlen"] is not None:
            raise NotImplementedError("the simulation does not emulate prefix / actual_seq_qlen / actual_seq_kvlen")
        qh = _to_bnsd(q, layout, heads, "query")
        b, n1, s1, d = qh.shape
        if n1 != heads:
            raise RuntimeError(f"flash_attention_score: head_num={heads} but the query has {n1} heads")
        if d % 16 or d > 512:
            raise RuntimeError(f"flash_attention_score: head_dim {d} must be a multiple of 16 and at most 512")
        if layout in ("BSH", "SBH"):
            kv_heads = k.shape[-1] // d
            if k.shape[-1] % d:
                raise RuntimeError(f"flash_attention_score: key hidden size {k.shape[-1]} is not a multiple of head_dim {d}")
        else:
            kv_heads = k.shape[1 if layout == "BNSD" else 2]
        kh = _to_bnsd(k, layout, kv_heads, "key")
        if tuple(v.shape) != tuple(k.shape):
            raise RuntimeError(f"flash_attention_score: value{tuple(v.shape)} must have the shape of key{tuple(k.shape)}")
        vh = _to_bnsd(v, layout, kv_heads, "value")
        _, n2, s2, dk = kh.shape
        if dk != d:
            raise RuntimeError(f"flash_attention_score: the D axis of query ({d}) and key ({dk}) differ")
        if kh.shape[0] != b or n1 % n2:
            raise RuntimeError(f"flash_attention_score: key{tuple(k.shape)} does not fit query{tuple(q.shape)} "
                               f"(same batch, and its heads must divide head_num={heads})")
        keep = _keep_matrix(a, b, n1, s1, s2)
        if not keep.any(axis=-1).all():
            raise ValueError("flash_attention_score: a query row has every key discarded (attn_mask 1 = discard)")
        shift = a["real_shift"]
        if shift is not None:
            if not isinstance(shift, Tensor):
                raise TypeError(f"flash_attention_score: 'real_shift' must be a Tensor, got {type(shift).__name__}")
            if shift.dtype != q.dtype:
                raise TypeError(f"flash_attention_score: real_shift ({shift.dtype}) must have the query's dtype ({q.dtype})")
            if tuple(shift.shape) not in ((b, n1, s1, s2), (1, n1, s1, s2)):
                raise RuntimeError(f"flash_attention_score: real_shift{tuple(shift.shape)} must be ({b}, {n1}, {s1}, {s2}) "
                                   f"or (1, {n1}, {s1}, {s2}) (the 1024-row ALiBi form is not emulated)")
        out = _compute(qh, kh, vh, keep, shift, float(a["scalar_value"]))
        return _from_bnsd(out.astype(q.dtype), layout)

    return flash_attention_score


def _compute(qh, kh, vh, keep: np.ndarray, shift, scale: float) -> Tensor:
    b, n1, s1, d = qh.shape
    n2, s2 = kh.shape[1], kh.shape[2]
    in_dtype = qh.dtype
    if n2 != n1:  # grouped heads: query head i reads key head i // (n1 // n2)
        index = Tensor(np.arange(n1, dtype=np.int32) // (n1 // n2))
        kh, vh = kh.astype(ms.float32)[:, index], vh.astype(ms.float32)[:, index]
    qf, kt, vf = qh.astype(ms.float32), mint.permute(kh.astype(ms.float32), (0, 1, 3, 2)), vh.astype(ms.float32)
    shift = None if shift is None else shift.astype(ms.float32)
    block = int(max(1, min(s1, _MAX_SCORE_BYTES // max(1, b * n1 * s2 * 4))))
    neg = Tensor(np.float32(-3.0e38))
    outs = []
    for start in range(0, s1, block):
        stop = min(s1, start + block)
        scores = mint.matmul(qf[:, :, start:stop], kt) * scale
        if shift is not None:
            scores = scores + shift[:, :, start:stop]
        drop = Tensor(~keep[:, :, start:stop])
        scores = mint.where(drop, neg, scores)
        probs = mint.softmax(scores, dim=-1)
        # the cube unit multiplies in the input dtype: the probabilities are rounded before P @ V
        probs = probs.astype(in_dtype).astype(ms.float32)
        outs.append(mint.matmul(probs, vf))
    return outs[0] if len(outs) == 1 else mint.cat(outs, dim=2)

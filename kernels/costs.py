"""Cost contracts of fastedge's Triton kernel launches (for bench/roofline.py).

One function per launcher of `masked_sum.py` and `hard_concrete.py`. Each
takes the call's shapes, dtypes and target architecture (and the launcher's
knobs as keyword arguments) and returns a `Cost`: the bytes it reads from
and writes to DRAM, the bytes it re-reads from L2, its FLOPs by kind and its
number of launches. The tile choices come from the kernels' own config
functions (`forward_config`, `backward_stack_config`, `backward_mask_config`,
`sampler_config`, `elementwise_config`), so a new heuristic shows here by
itself; a changed kernel (another product count, another reload pattern)
must change its function here. `custom_op_costs` maps each registered op of
`fastedge.ops` to the launches it makes on the `triton` backend.

Counting rules
--------------
* DRAM bytes: every distinct element a launch touches, read once and written
  once (the first touch of a tile). Rows beyond a call's prefix and masked
  lanes are not loaded, so they are not counted.
* L2 bytes: re-reads of elements another program of the same launch has
  already brought on chip (the forward's fp32 mask tile, reloaded by every
  column-tile program; the stack backward's dout, reloaded by every
  writer-tile program). They are counted apart from DRAM, at the L2's rate.
* FLOPs are what the tensor cores or ALUs execute, padding included: a dot
  over a [BLOCK_R, BLOCK_W] tile costs 2 * BLOCK_R * BLOCK_W * BLOCK_N even
  when fewer readers are valid. Kinds:
  ``tc16`` bf16/fp16 tensor-core products (the 16-bit forward and stack
  backward issue two per tile, hi and lo halves of the fp32 mask);
  ``tf32`` TF32 tensor-core products (fp32 stacks: ``tf32x3`` issues three);
  ``fp32`` SIMT arithmetic (the vector paths' FMAs, the hi/lo or tf32x3
  operand splits, the samplers' Philox and sigmoid; a few ops per element,
  stated beside each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import hard_concrete as khc
from . import masked_sum as kms

KINDS = ("tc16", "tf32", "fp32")

# SIMT work per element of an operand split: hi = round(m), lo = round(m - hi)
# (two conversions and a subtraction); tf32x3 splits both operands alike.
SPLIT_OPS_PER_ELEMENT = 3
# Per mask element of a training sample: Philox-4x32-10 (10 rounds of two
# 32-bit multiplies and two xors), two logs, a sigmoid, a clamp: about 60 ops.
SAMPLE_OPS_PER_ELEMENT = 60
EVAL_SAMPLE_OPS_PER_ELEMENT = 8
# sample_masks_backward re-derives the sample, then its gradient.
SAMPLE_BACKWARD_OPS_PER_ELEMENT = 70


@dataclass
class Cost:
    """One kernel launch (or a few, `launches`) of a fastedge launcher."""
    kernel: str
    dram_read: int = 0
    dram_write: int = 0
    l2_read: int = 0
    flops: dict = field(default_factory=dict)   # kind -> FLOPs
    launches: int = 1
    config: dict = field(default_factory=dict)

    @property
    def dram_bytes(self) -> int:
        return self.dram_read + self.dram_write

    def add_flops(self, kind: str, n: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown FLOP kind {kind!r}: use one of {KINDS}")
        if n:
            self.flops[kind] = self.flops.get(kind, 0) + int(n)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _products(dtype: torch.dtype, products_16bit: int) -> tuple[str, int]:
    """(FLOP kind, tensor-core products per tile step) of a dot with an fp32 mask
    operand: tf32x3 for fp32 stacks, hi + lo (or `products_16bit`) for 16 bits."""
    if dtype == torch.float32:
        return "tf32", 3
    return "tc16", products_16bit


def _check(R: int, W: int, N: int) -> None:
    for name, v in (("readers", R), ("writers", W), ("columns", N)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


# -- the masked writer sum ---------------------------------------------------------


def masked_sum_forward(R: int, W: int, N: int, dtype: torch.dtype, arch: int = 90, *,
                       base_rows: int = 0, has_index: bool = False, config: Optional[dict] = None,
                       products_16bit: int = 2) -> Cost:
    """`masked_sum_fwd`: out [R, N] = base[g(r)] + m [R, W] @ x [W, N].

    Grid: reader tiles x column tiles. Each program walks all W writers of
    its reader tile: the stack is read from DRAM once (other reader tiles of
    the same columns hit L2), and the whole fp32 mask of its readers
    (R_tile x W x 4 bytes) is loaded again by every column-tile program: L2.
    `base_rows`: G (0 without base); each reader loads its base row (DRAM
    once per row, L2 for readers sharing one). `products_16bit`: tensor-core
    products per tile in 16 bits (2: hi and lo halves of the mask)."""
    _check(R, W, N)
    e = _size(dtype)
    cfg = dict(config or kms.forward_config(R, W, N, dtype, arch=arch))
    c = Cost("masked_sum_fwd", config=cfg)
    if R == 0 or N == 0:
        c.launches = 0
        return c
    BR, BW, BN = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    r_tiles, n_tiles = _cdiv(R, BR), _cdiv(N, BN)
    programs = r_tiles * n_tiles
    w_steps = _cdiv(W, BW)
    c.dram_read = W * N * e + R * W * 4 + base_rows * N * e + (R * 8 if has_index else 0)
    c.dram_write = R * N * e
    c.l2_read = ((r_tiles - 1) * W * N * e                 # stack again for each further reader tile
                 + (n_tiles - 1) * R * W * 4                 # the mask, reloaded per column tile
                 + (max(R - base_rows, 0) * N * e if base_rows else 0))
    if cfg["USE_DOT"]:
        kind, products = _products(dtype, products_16bit)
        c.add_flops(kind, products * 2 * BR * BW * BN * w_steps * programs)
        split = BR * BW + (BW * BN if dtype == torch.float32 else 0)
        c.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * split * w_steps * programs)
    else:  # vector path: one fp32 FMA per reader lane and element
        c.add_flops("fp32", 2 * BR * (w_steps * BW) * BN * programs)
    if base_rows:
        c.add_flops("fp32", R * N)
    return c


def masked_sum_backward_stack(R: int, W: int, N: int, dtype: torch.dtype,
                              grad_dtype: torch.dtype, arch: int = 90, *,
                              config: Optional[dict] = None, products_16bit: int = 2) -> Cost:
    """`masked_sum_bwd_stack`: dx [W, N] += m^T @ dout [R, N], in place.

    Grid: writer tiles x column tiles, writer tiles fastest: dout is read
    from DRAM once and re-read from L2 by the other writer tiles; each
    program loads its writers' mask columns for every reader (mask reloaded
    per column tile: L2). dx is read and written once."""
    _check(R, W, N)
    e, g = _size(dtype), _size(grad_dtype)
    cfg = dict(config or kms.backward_stack_config(R, W, N, dtype, grad_dtype))
    c = Cost("masked_sum_bwd_stack", config=cfg)
    if R == 0 or W == 0 or N == 0:
        c.launches = 0
        return c
    BR, BW, BN = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    w_tiles, n_tiles = _cdiv(W, BW), _cdiv(N, BN)
    programs = w_tiles * n_tiles
    r_steps = _cdiv(R, BR)
    c.dram_read = R * N * e + R * W * 4 + W * N * g
    c.dram_write = W * N * g
    c.l2_read = (w_tiles - 1) * R * N * e + (n_tiles - 1) * R * W * 4
    if cfg["USE_DOT"]:
        kind, products = _products(dtype, products_16bit)
        c.add_flops(kind, products * 2 * BW * BR * BN * r_steps * programs)
        split = BR * BW + (BR * BN if dtype == torch.float32 else 0)
        c.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * split * r_steps * programs)
    else:
        c.add_flops("fp32", 2 * R * BW * BN * programs)
    c.add_flops("fp32", W * N)   # the read-modify-write add
    return c


def masked_sum_backward_mask(R: int, W: int, N: int, dtype: torch.dtype, arch: int = 90, *,
                             config: Optional[dict] = None) -> list[Cost]:
    """`masked_sum_bwd_mask`: dm [R, W] = dout [R, N] @ x [W, N]^T, as S slices
    of N into an fp32 scratch [S, R, W] and, when S > 1, a second launch that
    adds the slices in order. One product per tile step (both operands in
    the storage dtype; tf32x3 for fp32)."""
    _check(R, W, N)
    e = _size(dtype)
    cfg = dict(config or kms.backward_mask_config(R, W, N, dtype))
    main = Cost("masked_sum_bwd_mask", config=cfg)
    if R == 0 or W == 0 or N == 0:
        main.launches = 0
        # N == 0 zero-fills dm
        main.dram_write = R * W * 4 if (R and W) else 0
        return [main]
    BR, BW, BK, S, L = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_K"], cfg["SLICES"], cfg["SLICE_LEN"]
    r_tiles, w_tiles = _cdiv(R, BR), _cdiv(W, BW)
    k_steps = sum(_cdiv(min(L, N - s * L), BK) for s in range(S))   # over all slices
    main.dram_read = W * N * e + R * N * e
    main.dram_write = S * R * W * 4
    main.l2_read = (r_tiles - 1) * W * N * e + (w_tiles - 1) * R * N * e
    kind, products = _products(dtype, 1)
    main.add_flops(kind, products * 2 * BW * BR * BK * k_steps * r_tiles * w_tiles)
    if dtype == torch.float32:
        main.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * (BW + BR) * BK * k_steps * r_tiles * w_tiles)
    out = [main]
    if S > 1:
        s = Cost("sum_slices", config=dict(BLOCK=kms.SUM_SLICES_BLOCK, SLICES=S))
        s.dram_read = S * R * W * 4
        s.dram_write = R * W * 4
        s.add_flops("fp32", S * R * W)
        out.append(s)
    return out


# -- hard-concrete masks ---------------------------------------------------------------


def sample_masks(R: int, W: int, *, has_node: bool, training: bool = True) -> list[Cost]:
    """`sample_masks`: m [R, W] fp32 and the edge sum, from log_alpha [R, W]
    (and node log_alpha [W]); one program per BLOCK_W writers, then, with more
    than one program, one program adding the partial sums."""
    cfg = khc.sampler_config(R, W)
    c = Cost("sample_masks", config=cfg)
    if R == 0 or W == 0:
        c.launches = 0
        c.dram_write = 4
        return [c]
    n_prog = _cdiv(W, cfg["BLOCK_W"])
    per = SAMPLE_OPS_PER_ELEMENT if training else EVAL_SAMPLE_OPS_PER_ELEMENT
    c.dram_read = R * W * 4 + (W * 4 if has_node else 0)
    c.dram_write = R * W * 4 + n_prog * 4
    c.add_flops("fp32", per * (R * W + (W if has_node else 0)))
    out = [c]
    if n_prog > 1:
        out.append(Cost("sum_partials", dram_read=n_prog * 4, dram_write=4,
                        flops={"fp32": n_prog}, config=dict(BLOCK=khc.PARTIALS_BLOCK)))
    return out


def sample_masks_backward(R: int, W: int, *, has_node: bool, training: bool = True) -> Cost:
    """`sample_masks_backward`: d log_alpha [R, W] (and d node log_alpha [W])
    from dm [R, W], the masks re-derived from the seed."""
    cfg = khc.sampler_config(R, W)
    c = Cost("sample_masks_bwd", config=cfg)
    if W == 0 or (R == 0 and not has_node):
        c.launches = 0
        return c
    c.dram_read = 2 * R * W * 4 + 4 + (W * 4 if has_node else 0)
    c.dram_write = R * W * 4 + (W * 4 if has_node else 0)
    c.add_flops("fp32", SAMPLE_BACKWARD_OPS_PER_ELEMENT * (R * W + (W if has_node else 0)))
    return c


def hard_concrete(n: int, *, training: bool, backward: bool = False) -> Cost:
    """`hard_concrete_forward` / `hard_concrete_backward` over n elements."""
    cfg = khc.elementwise_config(n)
    c = Cost("hard_concrete_bwd" if backward else "hard_concrete_fwd", config=cfg)
    if n == 0:
        c.launches = 0
        return c
    streams_in = 1 + (1 if training else 0) + (1 if backward else 0)
    c.dram_read = streams_in * n * 4
    c.dram_write = n * 4
    c.add_flops("fp32", (30 if training else 8) * n)   # logs, sigmoid, clamp (no Philox: u is an input)
    return c


# -- registered ops -> launches ---------------------------------------------------------


def _rows_cols(t) -> tuple[int, int]:
    """[W, *T] -> (W, N) as `fastedge.ops._dispatch.flat_rows` sees it."""
    W = int(t.shape[0])
    return W, (math.prod(int(s) for s in t.shape[1:]) if t.dim() > 1 else 1)


def _memset(nbytes: int) -> Cost:
    return Cost("zeros", dram_write=nbytes)


def custom_op_costs(name: str, args: tuple, kwargs: Optional[dict] = None, arch: int = 90,
                    overrides: Optional[dict] = None) -> list[Cost]:
    """The launches the `triton` backend makes for one call of the registered op
    `name` ("fastedge::masked_writer_sum" or "masked_writer_sum", ...), from
    the call's arguments (tensors are read for shape and dtype only).
    `overrides`: {contract function name: keyword arguments} passed on, e.g.
    ``{"masked_sum_forward": {"config": {...}}}`` for another tile choice."""
    kwargs = dict(kwargs or {})
    ov = overrides or {}
    op = name.split("::")[-1].split(".")[0]
    a = list(args)

    def arg(i, key):
        return a[i] if i < len(a) else kwargs.get(key)

    if op == "masked_writer_sum":
        stack, mask, base, base_index = arg(0, "stack"), arg(1, "mask"), arg(2, "base"), arg(3, "base_index")
        W, N = _rows_cols(stack)
        G = 0 if base is None else (int(base.numel()) // max(N, 1))
        return [masked_sum_forward(int(mask.shape[0]), W, N, stack.dtype, arch, base_rows=G,
                                   has_index=base_index is not None, **ov.get("masked_sum_forward", {}))]
    if op == "sampled_masked_writer_sum":
        stack, ela, nla, base, base_index = (arg(0, "stack"), arg(1, "edge_log_alpha"),
                                             arg(2, "node_log_alpha"), arg(3, "base"), arg(4, "base_index"))
        training = bool(arg(8, "training"))
        W, N = _rows_cols(stack)
        R = int(ela.shape[0])
        G = 0 if base is None else (int(base.numel()) // max(N, 1))
        return (sample_masks(R, W, has_node=nla is not None, training=training)
                + [masked_sum_forward(R, W, N, stack.dtype, arch, base_rows=G,
                                      has_index=base_index is not None, **ov.get("masked_sum_forward", {}))])
    if op == "masked_writer_sum_backward_stack":
        mask, dout, like = arg(0, "mask"), arg(1, "dout"), arg(2, "n_writers_like")
        R, W = int(mask.shape[0]), int(mask.shape[1])
        N = int(dout.numel()) // max(R, 1)
        e = _size(dout.dtype)
        return [_memset(W * N * e), masked_sum_backward_stack(R, W, N, dout.dtype, dout.dtype, arch,
                                                              **ov.get("masked_sum_backward_stack", {}))]
    if op == "masked_writer_sum_accumulate_grad_":
        grad, mask, dout = arg(0, "grad_stack"), arg(1, "mask"), arg(2, "dout")
        R, W = int(mask.shape[0]), int(mask.shape[1])
        N = int(dout.numel()) // max(R, 1)
        return [masked_sum_backward_stack(R, W, N, dout.dtype, grad.dtype, arch,
                                          **ov.get("masked_sum_backward_stack", {}))]
    if op == "masked_writer_sum_backward_mask":
        stack, dout = arg(0, "stack"), arg(1, "dout")
        W, N = _rows_cols(stack)
        return masked_sum_backward_mask(int(dout.shape[0]), W, N, stack.dtype, arch,
                                        **ov.get("masked_sum_backward_mask", {}))
    if op == "sample_masks":
        ela, nla, training = arg(0, "edge_log_alpha"), arg(1, "node_log_alpha"), bool(arg(4, "training"))
        return sample_masks(int(ela.shape[0]), int(ela.shape[1]), has_node=nla is not None,
                            training=training)
    if op == "sample_masks_backward":
        ela, nla, training = arg(0, "edge_log_alpha"), arg(1, "node_log_alpha"), bool(arg(4, "training"))
        return [sample_masks_backward(int(ela.shape[0]), int(ela.shape[1]), has_node=nla is not None,
                                      training=training)]
    if op == "hard_concrete":
        la, training = arg(0, "log_alpha"), bool(arg(2, "training"))
        return [hard_concrete(int(la.numel()), training=training)]
    if op == "hard_concrete_backward":
        la, training = arg(0, "log_alpha"), bool(arg(2, "training"))
        return [hard_concrete(int(la.numel()), training=training, backward=True)]
    raise KeyError(f"no cost contract for the op {name!r}")

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
  backward issue one per tile for the hi half of the mask, and one more for
  its lo half where the tile's flag is set: `_products`);
  ``tf32`` TF32 tensor-core products (fp32 stacks: two or three, from the
  hand split into tf32 halves; the mask backward's ``tf32x3`` three);
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
from . import norms as kn

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


def _products(dtype: torch.dtype, split: bool, lo_fraction: float, legacy: bool) -> tuple[str, float]:
    """(FLOP kind, tensor-core products per tile step, on average) of a dot
    with the mask as one operand (`masked_sum._dot_split`): 16 bits, hi and,
    where a tile's flag is set (`lo_fraction` of the tiles), lo; fp32, hi
    times both tf32 halves of the stack and lo times the high one. `split`
    False: one product. `legacy`: the kernels before the split mask
    (before a4a47e4): hi and lo always in 16 bits, tf32x3 in fp32."""
    if dtype == torch.float32:
        return "tf32", (3.0 if legacy else (2.0 + lo_fraction if split else 1.0))
    return "tc16", (2.0 if legacy else (1.0 + lo_fraction if split else 1.0))


def _check(R: int, W: int, N: int) -> None:
    for name, v in (("readers", R), ("writers", W), ("columns", N)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def _live(W: int, live_fraction: float) -> int:
    """Writers a call reads: all of them, or the live share (`live_columns`)."""
    if not 0.0 <= live_fraction <= 1.0:
        raise ValueError(f"live_fraction must be in [0, 1], got {live_fraction}")
    return min(W, max(1, math.ceil(W * live_fraction))) if W else 0


def _mask_bytes(R: int, Wl: int, e: int, cfg: dict, split: bool, lo_fraction: float,
                legacy: bool) -> float:
    """Bytes of the mask one program loads for Wl writers: the fp32 mask (the
    vector path, or `legacy`), else its hi half in the product dtype and the
    lo half for the flagged share of the tiles."""
    if legacy or not cfg["USE_DOT"]:
        return R * Wl * 4
    return R * Wl * e * (1 + (lo_fraction if split else 0))


# Plain-PyTorch launches of `masked_sum.live_columns` (ne, any, sum, not,
# to int8, argsort, to int32), each over the [R, W] mask or a [W] vector.
LIVE_COLUMNS_LAUNCHES = 7


def mask_prep(R: int, W: int, dtype: torch.dtype, cfg: dict, *, split: bool = True,
              live: bool = True) -> list[Cost]:
    """What a dot launch of the masked sum makes of its mask first, once per
    call: the live columns (`live_columns`, when skipping dead writers) and
    the split halves (`_split_mask_kernel`: the fp32 mask in, hi and lo in the
    product dtype and a flag per tile out). The vector path reads the fp32
    mask itself (only the live columns are made)."""
    out = []
    if live and R and W:
        out.append(Cost("live_columns", dram_read=2 * R * W * 4, dram_write=3 * W * 4 + 4,
                        flops={"fp32": 2 * R * W}, launches=LIVE_COLUMNS_LAUNCHES))
    if cfg.get("USE_DOT") and R and W:
        e = _size(dtype)
        tiles = _cdiv(R, cfg["BLOCK_R"]) * _cdiv(W, cfg["BLOCK_W"])
        out.append(Cost("split_mask", dram_read=R * W * 4 + (W * 4 if live else 0),
                        dram_write=R * W * e * (2 if split else 1) + (tiles * 4 if split else 0),
                        flops={"fp32": SPLIT_OPS_PER_ELEMENT * R * W}, config=dict(cfg)))
    return out


# -- the masked writer sum ---------------------------------------------------------


def masked_sum_forward(R: int, W: int, N: int, dtype: torch.dtype, arch: int = 90, *,
                       base_rows: int = 0, has_index: bool = False, config: Optional[dict] = None,
                       split: bool = True, lo_fraction: float = 1.0, live_fraction: float = 1.0,
                       legacy: bool = False) -> Cost:
    """`masked_sum_fwd`'s main launch: out [R, N] = base[g(r)] + m [R, W] @ x [W, N]
    (its mask preparation is `mask_prep`).

    Grid: reader tiles x column tiles. Each program walks the live writers
    (`live_fraction` of W; all with `legacy`) of its reader tile: the stack
    rows are read from DRAM once (other reader tiles of the same columns hit
    L2), and the mask tiles of its readers are loaded again by every
    column-tile program (L2): hi in the product dtype, and lo for the
    `lo_fraction` of tiles whose flag is set (`split`); with `legacy`, the
    whole fp32 mask, split in every program. `base_rows`: G (0 without
    base); each reader loads its base row (DRAM once per row, L2 for readers
    sharing one)."""
    _check(R, W, N)
    e = _size(dtype)
    cfg = dict(config or kms.forward_config(R, W, N, dtype, arch=arch))
    c = Cost("masked_sum_fwd", config=cfg)
    if R == 0 or N == 0:
        c.launches = 0
        return c
    Wl = W if legacy else _live(W, live_fraction)
    BR, BW, BN = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    r_tiles, n_tiles = _cdiv(R, BR), _cdiv(N, BN)
    programs = r_tiles * n_tiles
    w_steps = _cdiv(Wl, BW)
    mask_bytes = _mask_bytes(R, Wl, e, cfg, split, lo_fraction, legacy)
    c.dram_read = Wl * N * e + mask_bytes + base_rows * N * e + (R * 8 if has_index else 0)
    c.dram_write = R * N * e
    c.l2_read = ((r_tiles - 1) * Wl * N * e                 # stack again for each further reader tile
                 + (n_tiles - 1) * mask_bytes                # the mask, reloaded per column tile
                 + (max(R - base_rows, 0) * N * e if base_rows else 0))
    if cfg["USE_DOT"]:
        kind, products = _products(dtype, split, lo_fraction, legacy)
        c.add_flops(kind, products * 2 * BR * BW * BN * w_steps * programs)
        per_step = (BR * BW if legacy else 0) + (BW * BN if dtype == torch.float32 else 0)
        c.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * per_step * w_steps * programs)
    else:  # vector path: one fp32 FMA per reader lane and element
        c.add_flops("fp32", 2 * BR * (w_steps * BW) * BN * programs)
    if base_rows:
        c.add_flops("fp32", R * N)
    return c


def masked_sum_backward_stack(R: int, W: int, N: int, dtype: torch.dtype,
                              grad_dtype: torch.dtype, arch: int = 90, *,
                              config: Optional[dict] = None, split: bool = True,
                              lo_fraction: float = 1.0, live_fraction: float = 1.0,
                              legacy: bool = False) -> Cost:
    """`masked_sum_bwd_stack`'s main launch: dx [W, N] += m^T @ dout [R, N], in
    place (its mask preparation is `mask_prep`).

    Grid: writer tiles x column tiles, writer tiles fastest; only the tiles
    of live writers work (the others return at once). dout is read from DRAM
    once and re-read from L2 by the other live writer tiles; each program
    loads its writers' mask halves for every reader (reloaded per column
    tile: L2). The live rows of dx are read and written once."""
    _check(R, W, N)
    e, g = _size(dtype), _size(grad_dtype)
    cfg = dict(config or kms.backward_stack_config(R, W, N, dtype, grad_dtype))
    c = Cost("masked_sum_bwd_stack", config=cfg)
    if R == 0 or W == 0 or N == 0:
        c.launches = 0
        return c
    Wl = W if legacy else _live(W, live_fraction)
    if legacy:
        cfg["BY_COLUMNS"] = False
    BR, BW, BN = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    w_tiles, n_tiles = _cdiv(Wl, BW), _cdiv(N, BN)
    programs = w_tiles * n_tiles
    r_steps = _cdiv(R, BR)
    mask_bytes = _mask_bytes(R, Wl, e, cfg, split, lo_fraction, legacy)
    c.dram_read = R * N * e + mask_bytes + Wl * N * g
    c.dram_write = Wl * N * g
    # by columns (`_masked_sum_bwd_stack_by_columns_kernel`): each program
    # holds its columns of dout, so only the mask is re-read (per column tile)
    dout_rereads = 0 if cfg.get("BY_COLUMNS") else (w_tiles - 1) * R * N * e
    c.l2_read = dout_rereads + (n_tiles - 1) * mask_bytes
    if cfg.get("BY_COLUMNS"):
        c.kernel = "masked_sum_bwd_stack_by_columns"
    if cfg["USE_DOT"]:
        kind, products = _products(dtype, split, lo_fraction, legacy)
        c.add_flops(kind, products * 2 * BW * BR * BN * r_steps * programs)
        per_step = (BR * BW if legacy else 0) + (BR * BN if dtype == torch.float32 else 0)
        if cfg.get("BY_COLUMNS"):   # dout split once per program, not per writer tile
            c.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * BR * BN * n_tiles * (dtype == torch.float32))
        else:
            c.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * per_step * r_steps * programs)
    else:
        c.add_flops("fp32", 2 * R * BW * BN * programs)
    c.add_flops("fp32", Wl * N)   # the read-modify-write add
    return c


def masked_sum_backward_mask(R: int, W: int, N: int, dtype: torch.dtype, arch: int = 90, *,
                             config: Optional[dict] = None, live_fraction: Optional[float] = None,
                             legacy: bool = False, split: bool = True) -> list[Cost]:
    """`masked_sum_bwd_mask`: dm [R, W] = dout [R, N] @ x [W, N]^T, as S slices
    of N into an fp32 scratch [S, R, W] and, when S > 1, a second launch that
    adds the slices in order. One product per tile step (both operands in
    the storage dtype; tf32x3 for fp32). `live_fraction` (the fused op's
    backward, which passes its mask): only live writers are read, after a
    zero fill of the scratch and `live_columns`."""
    _check(R, W, N)
    e = _size(dtype)
    cfg = dict(config or kms.backward_mask_config(R, W, N, dtype))
    main = Cost("masked_sum_bwd_mask", config=cfg)
    if R == 0 or W == 0 or N == 0:
        main.launches = 0
        # N == 0 zero-fills dm
        main.dram_write = R * W * 4 if (R and W) else 0
        return [main]
    skipping = live_fraction is not None and not legacy
    Wl = _live(W, live_fraction) if skipping else W
    BR, BW, BK, S, L = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_K"], cfg["SLICES"], cfg["SLICE_LEN"]
    r_tiles, w_tiles = _cdiv(R, BR), _cdiv(Wl, BW)
    k_steps = sum(_cdiv(min(L, N - s * L), BK) for s in range(S))   # over all slices
    main.dram_read = Wl * N * e + R * N * e
    main.dram_write = S * R * Wl * 4
    main.l2_read = (r_tiles - 1) * Wl * N * e + (w_tiles - 1) * R * N * e
    # 16 bits: one exact product; fp32: tf32x3, or one in precision fast
    # (`masked_sum._dot_storage`)
    if dtype == torch.float32:
        kind, products = "tf32", (3 if split or legacy else 1)
    else:
        kind, products = "tc16", 1
    main.add_flops(kind, products * 2 * BW * BR * BK * k_steps * r_tiles * w_tiles)
    if dtype == torch.float32:
        main.add_flops("fp32", SPLIT_OPS_PER_ELEMENT * (BW + BR) * BK * k_steps * r_tiles * w_tiles)
    out = [main]
    if skipping:
        out = mask_prep(R, W, dtype, dict(USE_DOT=False), live=True) + [_memset(S * R * W * 4)] + out
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


def _forward_launches(R, W, N, dtype, arch, G, has_index, fast, ov) -> list[Cost]:
    kw = dict(ov.get("masked_sum_forward", {}))
    kw.setdefault("split", not fast)
    main = masked_sum_forward(R, W, N, dtype, arch, base_rows=G, has_index=has_index, **kw)
    if kw.get("legacy"):
        return [main]
    return mask_prep(R, W, dtype, main.config, split=kw["split"]) + [main]


def _stack_launches(R, W, N, dtype, grad_dtype, arch, fast, ov) -> list[Cost]:
    kw = dict(ov.get("masked_sum_backward_stack", {}))
    kw.setdefault("split", not fast)
    main = masked_sum_backward_stack(R, W, N, dtype, grad_dtype, arch, **kw)
    if kw.get("legacy"):
        return [main]
    return mask_prep(R, W, dtype, main.config, split=kw["split"]) + [main]


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

    if op in ("norm", "norm_backward"):   # the fused reader norm (kernels/norms.py)
        x, rms = arg(0, "x"), bool(arg(4, "rms"))
        bias = None if op == "norm_backward" else arg(2, "bias")
        D = int(x.shape[-1])
        return [Cost(**kn.norm_cost(int(x.numel()) // max(D, 1), D, x.dtype, kind="rms" if rms else "layer",
                                    backward=op == "norm_backward", has_bias=bias is not None))]
    if op == "masked_writer_sum":
        stack, mask, base, base_index = arg(0, "stack"), arg(1, "mask"), arg(2, "base"), arg(3, "base_index")
        W, N = _rows_cols(stack)
        G = 0 if base is None else (int(base.numel()) // max(N, 1))
        return _forward_launches(int(mask.shape[0]), W, N, stack.dtype, arch, G, base_index is not None,
                                 bool(arg(6, "fast")), ov)
    if op == "sampled_masked_writer_sum":
        stack, ela, nla, base, base_index = (arg(0, "stack"), arg(1, "edge_log_alpha"),
                                             arg(2, "node_log_alpha"), arg(3, "base"), arg(4, "base_index"))
        training = bool(arg(8, "training"))
        W, N = _rows_cols(stack)
        R = int(ela.shape[0])
        G = 0 if base is None else (int(base.numel()) // max(N, 1))
        return (sample_masks(R, W, has_node=nla is not None, training=training)
                + _forward_launches(R, W, N, stack.dtype, arch, G, base_index is not None,
                                    bool(arg(10, "fast")), ov))
    if op == "masked_writer_sum_backward_stack":
        mask, dout, like = arg(0, "mask"), arg(1, "dout"), arg(2, "n_writers_like")
        R, W = int(mask.shape[0]), int(mask.shape[1])
        N = int(dout.numel()) // max(R, 1)
        e = _size(dout.dtype)
        return [_memset(W * N * e)] + _stack_launches(R, W, N, dout.dtype, dout.dtype, arch,
                                                      bool(arg(4, "fast")), ov)
    if op == "masked_writer_sum_accumulate_grad_":
        grad, mask, dout = arg(0, "grad_stack"), arg(1, "mask"), arg(2, "dout")
        R, W = int(mask.shape[0]), int(mask.shape[1])
        N = int(dout.numel()) // max(R, 1)
        return _stack_launches(R, W, N, dout.dtype, grad.dtype, arch, bool(arg(4, "fast")), ov)
    if op == "masked_writer_sum_backward_mask":
        stack, dout, live_mask = arg(0, "stack"), arg(1, "dout"), arg(4, "live_mask")
        W, N = _rows_cols(stack)
        kw = dict(ov.get("masked_sum_backward_mask", {}))
        kw.setdefault("split", not bool(arg(5, "fast")))
        if live_mask is None:
            kw.pop("live_fraction", None)
        elif not kw.get("legacy"):
            kw.setdefault("live_fraction", 1.0)
        return masked_sum_backward_mask(int(dout.shape[0]), W, N, stack.dtype, arch, **kw)
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

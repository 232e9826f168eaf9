"""Sweep the Triton masked-sum block sizes on a GPU: evidence for the heuristics.

`kernels/masked_sum.py` picks block sizes with `forward_config` and
`backward_stack_config` (chosen from ptxas reports, without a GPU). This
script times candidate configurations of the forward and of the stack
backward at real layer shapes (CodeLlama-13B bf16 batch 8 and 1, GPT-2 small
fp32 batch 32), checks each against an fp32 PyTorch computation of the same
sum before timing it (a configuration that fails to compile or disagrees is
reported, not timed), and prints one line per (shape, configuration): median
time with `triton.testing.do_bench`, achieved bandwidth (the stack prefix and
the outputs, each moved once; docs/CONCEPTS.md section 5) and its fraction of a
device-to-device copy measured in the same run. The current heuristic's row
is marked ``*``. It records nothing: the lines go to stdout (bench/gpu.sh keeps
them in its log), headed by the revision (`bench/results_csv.py`).

    python bench/tune.py                 # all shapes (a GPU; about a minute)
    python bench/tune.py --shapes gpt2-L11 --ops fwd
    python bench/tune.py --variants      # the heuristic's tiles, each kernel variant

`--variants` times, with the heuristic's block sizes, the forward and the
stack backward at each shape under masks of four kinds (fractional values
everywhere; 0s and 1s, where the lo product is skipped; 90% and 99% of the
writers dead, where the kernels read only the live ones) in each precision
(full: the mask carried in two products where a tile needs it; fast: one
product), and the dense path (skip_dead=False) beside the live-column path:
evidence for `_split_mask`'s flags, `live_columns` and ``precision="fast"``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_csv  # noqa: E402  (bench/results_csv.py: the revision the log names)

from fastedge.kernels import masked_sum as kms  # noqa: E402

# name: (readers, writers, columns N = batch * seq * hidden, dtype)
SHAPES = {
    "cl13b-b8-L39": (121, 1640, 8 * 72 * 5120, torch.bfloat16),
    "cl13b-b8-L20": (121, 861, 8 * 72 * 5120, torch.bfloat16),
    "cl13b-b1-L39": (121, 1640, 1 * 72 * 5120, torch.bfloat16),
    "gpt2-L11": (37, 157, 32 * 64 * 768, torch.float32),
    "gpt2-L5": (37, 79, 32 * 64 * 768, torch.float32),
    "cl13b-b8-L20-mlp": (1, 861 + 40, 8 * 72 * 5120, torch.bfloat16),  # the MLP's lone reader
}


def fwd_candidates(R, W, N, dtype):
    block_r = kms.forward_config(R, W, N, dtype)["BLOCK_R"]
    if R < kms.DOT_MIN_READERS:  # the vector path
        grid = [(1024, 8, 4, 1), (512, 8, 4, 1), (2048, 8, 8, 1), (1024, 16, 8, 1), (512, 4, 4, 1),
                (1024, 8, 4, 2)]
        return [dict(USE_DOT=False, BLOCK_R=block_r, BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns)
                for bn, bw, nw, ns in grid]
    base = dict(USE_DOT=True, BLOCK_R=block_r)
    grid = [(128, 32, 8, 3), (256, 32, 8, 3), (128, 64, 8, 3), (256, 64, 8, 2), (64, 64, 4, 4),
            (128, 32, 4, 4), (64, 32, 4, 3), (128, 16, 4, 3), (256, 16, 8, 3)]
    return [dict(base, BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns) for bn, bw, nw, ns in grid]


def bwd_candidates(R, W, N, dtype):
    if R < kms.DOT_MIN_READERS:
        grid = [(16, 256, 4, 1), (16, 512, 4, 1), (32, 256, 4, 1), (8, 512, 4, 1), (16, 1024, 8, 1)]
        return [dict(USE_DOT=False, BLOCK_R=1, BLOCK_W=bw, BLOCK_N=bn, num_warps=nw, num_stages=ns)
                for bw, bn, nw, ns in grid]
    grid = [(16, 128, 128, 8, 3), (32, 128, 128, 8, 3), (16, 128, 256, 8, 3), (16, 64, 128, 4, 3),
            (32, 64, 256, 8, 3), (16, 256, 64, 8, 3)]
    out = [dict(USE_DOT=True, BY_COLUMNS=False, BLOCK_R=br, BLOCK_W=bw, BLOCK_N=bn, num_warps=nw,
                num_stages=ns) for br, bw, bn, nw, ns in grid]
    if R <= kms.MAX_BLOCK_R:  # by column tiles: every reader in one tile
        out += [dict(USE_DOT=True, BY_COLUMNS=True, BLOCK_R=kms._pow2(R), BLOCK_W=bw, BLOCK_N=bn,
                     num_warps=nw, num_stages=ns)
                for bw, bn, nw, ns in [(64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3)]]
    return out


def copy_bandwidth(device) -> float:
    import triton
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * n / (ms * 1e-3)


def run(shapes, ops) -> None:
    import triton
    device = torch.device("cuda")
    bw_copy = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name()}; copy bandwidth {bw_copy / 1e12:.2f} TB/s "
          f"(read + write); triton {triton.__version__}; torch {torch.__version__}; "
          f"fastedge @ {results_csv.git_revision()}")
    g = torch.Generator(device=device).manual_seed(0)
    for name in shapes:
        R, W, N, dtype = SHAPES[name]
        x = torch.randn(W, N, device=device, dtype=dtype, generator=g)
        m = torch.rand(R, W, device=device, generator=g)
        base = torch.randn(1, N, device=device, dtype=dtype, generator=g)
        cols = slice(0, min(N, 1 << 16))  # the check: a slice of columns, in fp32
        esz = x.element_size()
        if "fwd" in ops:
            want = (m.double() @ x[:, cols].double() + base[:, cols].double()).float()
            nbytes = W * N * esz + R * N * esz + N * esz
            current = kms.forward_config(R, W, N, dtype, arch=kms._arch(device))
            for cfg in fwd_candidates(R, W, N, dtype):
                tag = "*" if all(current.get(k) == v for k, v in cfg.items()) else " "
                label = (f"fwd {name:>13} {tag} BN={cfg['BLOCK_N']:<3} BW={cfg['BLOCK_W']:<3} "
                         f"warps={cfg['num_warps']} stages={cfg['num_stages']}")
                try:
                    out = torch.full((R, N), float("nan"), device=device, dtype=dtype)
                    kms.masked_sum_fwd(x, m, base, None, out, config=cfg)
                    err = ((out[:, cols].float() - want).abs().max() / want.abs().max()).item()
                    if not err < (1e-5 if dtype == torch.float32 else 1e-2):
                        print(f"{label}: WRONG (relative error {err:.3g})", flush=True)
                        continue
                    ms = triton.testing.do_bench(lambda: kms.masked_sum_fwd(x, m, base, None, out, config=cfg),
                                                 warmup=10, rep=100, return_mode="median")
                    print(f"{label}: {ms:8.3f} ms  {nbytes / (ms * 1e-3) / 1e9:7.0f} GB/s  "
                          f"{nbytes / (ms * 1e-3) / bw_copy:5.1%} of copy  (err {err:.1e})", flush=True)
                except Exception as exc:  # noqa: BLE001  (compile failures are results too)
                    print(f"{label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        if "bwd" in ops:
            dout = torch.randn(R, N, device=device, dtype=dtype, generator=g)
            want = (m.double().t() @ dout[:, cols].double()).float()
            nbytes = R * N * esz + 2 * W * N * 4  # dout read, fp32 dx read + written
            if W * N * 4 > 24 * 2 ** 30:
                print(f"bwd {name}: skipped (an fp32 gradient of {W * N * 4 / 2 ** 30:.0f} GiB)")
                continue
            dx = torch.zeros(W, N, device=device, dtype=torch.float32)
            current = kms.backward_stack_config(R, W, N, dtype, torch.float32)
            for cfg in bwd_candidates(R, W, N, dtype):
                tag = "*" if all(current.get(k) == v for k, v in cfg.items()) else " "
                label = (f"bwd {name:>13} {tag} BR={cfg['BLOCK_R']:<3} BW={cfg['BLOCK_W']:<3} "
                         f"BN={cfg['BLOCK_N']:<3} warps={cfg['num_warps']} stages={cfg['num_stages']}"
                         + (" cols" if cfg.get("BY_COLUMNS") else ""))
                try:
                    dx.zero_()
                    kms.masked_sum_bwd_stack(m, dout, dx, config=cfg)
                    err = ((dx[:, cols] - want).abs().max() / want.abs().max()).item()
                    if not err < (1e-5 if dtype == torch.float32 else 1e-2):
                        print(f"{label}: WRONG (relative error {err:.3g})", flush=True)
                        continue
                    ms = triton.testing.do_bench(lambda: kms.masked_sum_bwd_stack(m, dout, dx, config=cfg),
                                                 warmup=10, rep=100, return_mode="median")
                    print(f"{label}: {ms:8.3f} ms  {nbytes / (ms * 1e-3) / 1e9:7.0f} GB/s  "
                          f"{nbytes / (ms * 1e-3) / bw_copy:5.1%} of copy  (err {err:.1e})", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"{label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            del dx, dout
        del x, m, base
        torch.cuda.empty_cache()


def variant_masks(R, W, device, g):
    """name -> mask [R, W] fp32: the kinds of masks a pruning run sees."""
    frac = torch.rand(R, W, device=device, generator=g)
    binary = (frac > 0.3).float()
    masks = {"fractional": frac, "binary": binary}
    for dead in (0.9, 0.99):
        keep = torch.rand(W, device=device, generator=g) >= dead
        keep[0] = True
        masks[f"{dead:.0%}-dead"] = binary * keep
    return masks


def run_variants(shapes, ops) -> None:
    import triton
    device = torch.device("cuda")
    bw_copy = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name()}; copy bandwidth {bw_copy / 1e12:.2f} TB/s "
          f"(read + write); triton {triton.__version__}; torch {torch.__version__}; variants")
    g = torch.Generator(device=device).manual_seed(0)
    for name in shapes:
        R, W, N, dtype = SHAPES[name]
        x = torch.randn(W, N, device=device, dtype=dtype, generator=g)
        out = torch.empty((R, N), device=device, dtype=dtype)
        dout = torch.randn(R, N, device=device, dtype=dtype, generator=g)
        dx = torch.zeros(W, N, device=device, dtype=dtype)  # a buffer in the storage dtype (the default)
        esz = x.element_size()
        bwd_cfg = kms.backward_stack_config(R, W, N, dtype, dx.dtype)
        # the stack backward's two grids: by column tiles (the heuristic's for
        # 16-128 readers) and by writer tiles (16 readers a step)
        grids = {"by-cols": bwd_cfg}
        if bwd_cfg.get("BY_COLUMNS"):
            grids["by-writers"] = dict(bwd_cfg, BY_COLUMNS=False, BLOCK_R=16)
        for kind, m in variant_masks(R, W, device, g).items():
            live = int((m != 0).any(0).sum())
            for split in (True, False):
                for skip in (True, False):
                    runs = {("fwd", ""): lambda: kms.masked_sum_fwd(x, m, None, None, out, split=split,
                                                                    skip_dead=skip)}
                    for grid_name, cfg in grids.items():
                        runs[("bwd", grid_name)] = (lambda cfg=cfg: kms.masked_sum_bwd_stack(
                            m, dout, dx, config=cfg, split=split, skip_dead=skip))
                    for (op, grid_name), fn in runs.items():
                        if op not in ops:
                            continue
                        rows = live if skip else W
                        nbytes = (rows * N * esz + R * N * esz if op == "fwd"
                                  else R * N * esz + 2 * rows * N * esz)
                        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
                        print(f"{op} {name:>13} {kind:>10} live {live:5d}/{W:<5d} "
                              f"{'full' if split else 'fast'} {'live-cols' if skip else 'dense    '} "
                              f"{grid_name:>10}: {ms:8.3f} ms  {nbytes / (ms * 1e-3) / bw_copy:5.1%} of copy",
                              flush=True)
        del x, out, dout, dx
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--ops", default="fwd,bwd", help="fwd, bwd or both")
    ap.add_argument("--variants", action="store_true",
                    help="time the kernel variants (precision, live columns) at the heuristic's tiles")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/tune.py times Triton kernels on a GPU; none is visible here", file=sys.stderr)
        return 2
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: choose from {', '.join(SHAPES)}")
    (run_variants if args.variants else run)(shapes, [o.strip() for o in args.ops.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every Triton kernel compiles for sm_80 and sm_90, at real layer shapes,
without register spills, and the dot kernels use tensor cores.

No GPU is needed: `triton.compile` builds PTX and a cubin for a `GPUTarget`,
and `ptxas -v` on the PTX reports registers and spills. The block sizes come
from the same heuristic functions the launchers use, so this compiles what
would run.

Shapes (the paper's GPT-2 and CodeLlama runs): GPT-2 small (batch 32, seq 64, hidden 768, fp32;
37 readers per layer call: 12 q + 12 k + 12 v + 1 mlp, and 1 for resid_post;
up to 158 writers) and CodeLlama-13B (bf16; N = 1 or 8 x 72 x 5120; 121
readers: 40 q + 40 k + 40 v + 1 mlp, and 1; up to 1,641 writers).

The compilations run in a child process with TRITON_INTERPRET unset
(tests/conftest.py turns the interpreter on for the whole session when there
is no GPU, and then even Triton's own library functions are interpreted and
cannot be compiled). The child compiles every distinct (kernel,
specialisation, target) once, in parallel over the CPU cores, and the
parametrized tests below read its results. Run this file directly
(`python tests/test_triton_kernels_compile.py`) to print the table.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
except Exception as exc:  # pragma: no cover - very old or broken Triton
    pytest.skip(f"triton has no GPUTarget ({exc})", allow_module_level=True)

CCS = [80, 90]
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                    torch.int64: "i64", torch.int32: "i32"}


def _ptxas_candidates(cc: int) -> list:
    """ptxas binaries to try, Triton's own choice for the target first (Triton
    3.9 compiles sm_90 with a newer ptxas than sm_80; the PTX version follows)."""
    paths = []
    try:
        from triton.backends.nvidia import compiler as nv
        paths.append(nv.get_ptxas(cc).path)
    except Exception:
        pass
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths += [os.path.join(bin_dir, "ptxas-blackwell"), os.path.join(bin_dir, "ptxas"),
              shutil.which("ptxas"), "/usr/local/bin/ptxas", "/usr/local/cuda/bin/ptxas"]
    seen, out = set(), []
    for p in paths:
        if p and p not in seen and os.path.exists(p):
            seen.add(p)
            out.append(p)
    return out


# -- compiling one kernel ----------------------------------------------------------------

def _int_type(v: int) -> str:
    if -2 ** 31 <= v < 2 ** 31:
        return "i32"
    return "i64" if v < 2 ** 63 else "u64"


def compile_kernel(kernel, cc: int, pointers: dict, scalars: dict, constexprs: dict,
                   num_warps: int, num_stages: int):
    """Compile `kernel` as the runtime would specialise it for these
    arguments: pointers 16-byte aligned, integers divisible by 16 marked so,
    integers equal to 1 turned into constants (unless do_not_specialize)."""
    no_spec = {kernel.arg_names[i] if isinstance(i, int) else i
               for i in (getattr(kernel, "do_not_specialize", None) or [])}
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + _TORCH_TO_TRITON[pointers[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in scalars:
            v = scalars[name]
            if isinstance(v, float):
                signature[name] = "fp32"
            elif v == 1 and name not in no_spec:
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = _int_type(v)
                if v % 16 == 0 and name not in no_spec:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{kernel.__name__}: no value for argument {name!r}")
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts,
                                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(ptx: str, cc: int) -> dict:
    """Registers and spill bytes from `ptxas -v` on the PTX (the first ptxas
    that accepts its PTX version)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates(cc):
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={target}", path,
                                   "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
            errors.append(f"{ptxas}: {proc.stderr.strip()}")
        else:
            raise RuntimeError("no ptxas accepts this PTX:\n" + "\n".join(errors))
    text = proc.stderr + proc.stdout
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
    stores = [int(v) for v in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(v) for v in re.findall(r"(\d+) bytes spill loads", text)]
    assert regs and stores and loads, text
    return dict(target=target, ptxas=ptxas, registers=max(regs), spill_stores=sum(stores),
                spill_loads=sum(loads), log=text)


# -- what to compile -------------------------------------------------------------------------

GPT2_N = 32 * 64 * 768
LLAMA_N = (1 * 72 * 5120, 8 * 72 * 5120)
# (name, R, W, N, storage dtype)
LAYER_SHAPES = [
    ("gpt2-R37", 37, 158, GPT2_N, torch.float32),
    ("gpt2-R1", 1, 158, GPT2_N, torch.float32),
    ("llama13b-R121-b1", 121, 1641, LLAMA_N[0], torch.bfloat16),
    ("llama13b-R121-b8", 121, 1641, LLAMA_N[1], torch.bfloat16),
    ("llama13b-R1-b8", 1, 1641, LLAMA_N[1], torch.bfloat16),
    ("fp16-R37", 37, 158, 4096 * 64, torch.float16),
]


def _representative(v):
    if isinstance(v, float) or v == 1:
        return v
    odd = v % 16 != 0
    return (16 + odd) if _int_type(v) == "i32" else 2 ** 32 + odd


def _freeze(d: dict):
    return tuple(sorted((k, v if not isinstance(v, torch.dtype) else str(v)) for k, v in d.items()))


def compile_job(job) -> dict:
    """Compile one (kernel, specialisation) for one target and read ptxas.
    Runs in the child process (kernels defined without the interpreter)."""
    (name, kind, key), cc = job
    spec = dict(key)
    try:
        import importlib
        module = importlib.import_module("fastedge.kernels." + spec.pop("module"))
        kernel = getattr(module, spec.pop("kernel"))
        pointers = {k[2:]: getattr(torch, v.split(".")[-1]) for k, v in spec.items()
                    if k.startswith("p:")}
        scalars = {k[2:]: v for k, v in spec.items() if k.startswith("s:")}
        constexprs = {k[2:]: v for k, v in spec.items() if k.startswith("c:")}
        k = compile_kernel(kernel, cc, pointers, scalars, constexprs, spec["num_warps"],
                           spec["num_stages"])
        ptx = k.asm["ptx"]
        rep = ptxas_report(ptx, cc)
        rep.update(ok=True, wgmma="wgmma" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)),
                   shared=getattr(k.metadata, "shared", None))
        return rep
    except Exception as exc:  # reported by the test of this job
        import traceback
        return dict(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _key(module, kernel, pointers, scalars, constexprs, cfg):
    d = {"module": module, "kernel": kernel, "num_warps": cfg["num_warps"],
         "num_stages": cfg.get("num_stages", 1)}
    d.update({f"p:{k}": str(v) for k, v in pointers.items()})
    # Scalars enter the key by how the runtime specialises them (type, divisible
    # by 16, equal to 1), so shapes that compile the same share one compilation.
    d.update({f"s:{k}": _representative(v) for k, v in scalars.items()})
    d.update({f"c:{k}": v for k, v in constexprs.items()})
    return _freeze(d)


def masked_sum_jobs(cc: int):
    """(id, kind, key) for each masked-sum kernel at each layer shape, with the
    block sizes the launchers pick on compute capability `cc`."""
    from fastedge.kernels import masked_sum as kms  # the launchers' own heuristics
    jobs = []
    for name, R, W, N, dt in LAYER_SHAPES:
        # forward: the q/k/v/mlp call has two base rows (before the layer, and
        # between attention and MLP); resid_post has one.
        cfg = kms.forward_config(R, W, N, dt, arch=cc)
        indexed = R > 1
        # the mask's halves (`_split_mask`) are in the storage dtype; the
        # single-product form (SPLIT=False) is compiled at the dot shapes too
        halves = dict(hi_ptr=dt, lo_ptr=dt, flag_ptr=torch.int32, cols_ptr=torch.int32,
                      count_ptr=torch.int32)
        ptrs = dict(x_ptr=dt, m_ptr=torch.float32, **halves, base_ptr=dt,
                    index_ptr=torch.int64 if indexed else dt, out_ptr=dt)
        for split in ((True, False) if cfg["USE_DOT"] else (True,)):
            consts = dict(HAS_BASE=True, HAS_INDEX=indexed, HAS_COLS=True, DOT_IN_FP32=False,
                          SPLIT=split,
                          **{k: cfg[k] for k in ("USE_DOT", "BLOCK_R", "BLOCK_W", "BLOCK_N")})
            if dt == torch.float16:
                consts["HAS_BASE"], consts["HAS_INDEX"] = False, False
            jobs.append((f"fwd-{name}" + ("" if split else "-one_product"),
                         "dot" if cfg["USE_DOT"] else "vector",
                         _key("masked_sum", "_masked_sum_fwd_kernel", ptrs,
                              dict(R=R, W=W, N=N, stride_x=N), consts, cfg)))
        if cfg["USE_DOT"]:
            jobs.append((f"split_mask-{name}", "vector",
                         _key("masked_sum", "_split_mask_kernel", dict(m_ptr=torch.float32, **halves),
                              dict(R=R, W=W), dict(KEEP_LO=True, HAS_COLS=True,
                                                   BLOCK_R=cfg["BLOCK_R"],
                                                   BLOCK_W=cfg["BLOCK_W"]),
                              dict(num_warps=4))))
        # backward, stack: an fp32 gradient buffer, and one in the storage dtype
        for gdt in sorted({torch.float32, dt}, key=str):
            cfg = kms.backward_stack_config(R, W, N, dt, gdt)
            consts = dict(DOT_IN_FP32=False, SPLIT=True, HAS_COLS=True,
                          **{k: cfg[k] for k in ("BLOCK_R", "BLOCK_W", "BLOCK_N")})
            if cfg["BY_COLUMNS"]:
                kernel, ptrs = "_masked_sum_bwd_stack_by_columns_kernel", dict(**halves, dout_ptr=dt,
                                                                                 dx_ptr=gdt)
            else:
                kernel = "_masked_sum_bwd_stack_kernel"
                ptrs = dict(m_ptr=torch.float32, **halves, dout_ptr=dt, dx_ptr=gdt)
                consts["USE_DOT"] = cfg["USE_DOT"]
            jobs.append((f"bwd_stack-{name}-grad_{_TORCH_TO_TRITON[gdt]}",
                         "dot" if cfg["USE_DOT"] else "vector",
                         _key("masked_sum", kernel, ptrs, dict(R=R, W=W, N=N, stride_dx=N), consts, cfg)))
        # backward, mask
        cfg = kms.backward_mask_config(R, W, N, dt)
        ptrs = dict(x_ptr=dt, dout_ptr=dt, part_ptr=torch.float32, cols_ptr=torch.int32,
                    count_ptr=torch.int32)
        for fast in ((False, True) if dt == torch.float32 else (False,)):  # fast: one tf32 product
            consts = dict(DOT_IN_FP32=False, HAS_COLS=True, FAST=fast,
                          **{k: cfg[k] for k in ("BLOCK_R", "BLOCK_W", "BLOCK_K")})
            jobs.append((f"bwd_mask-{name}" + ("-one_product" if fast else ""), "dot",
                         _key("masked_sum", "_masked_sum_bwd_mask_kernel", ptrs,
                              dict(R=R, W=W, N=N, stride_x=N, slice_len=cfg["SLICE_LEN"]), consts,
                              cfg)))
    jobs.append(("sum_slices", "vector",
                 _key("masked_sum", "_sum_slices_kernel",
                      dict(part_ptr=torch.float32, out_ptr=torch.float32),
                      dict(S=7, RW=121 * 1641), dict(BLOCK=kms.SUM_SLICES_BLOCK),
                      dict(num_warps=4))))
    return jobs


def hard_concrete_jobs():
    from fastedge.kernels import hard_concrete as khc
    from fastedge.kernels import reference as ref
    jobs = []
    cfg = khc.elementwise_config(3_877_661)
    for training in (True, False):
        t = "train" if training else "eval"
        f32 = torch.float32
        jobs.append((f"hc_fwd-{t}", "vector", _key(
            "hard_concrete", "_hard_concrete_fwd_kernel", dict(la_ptr=f32, u_ptr=f32, z_ptr=f32),
            dict(n=3_877_661), dict(TRAINING=training, BLOCK=cfg["BLOCK"]), cfg)))
        jobs.append((f"hc_bwd-{t}", "vector", _key(
            "hard_concrete", "_hard_concrete_bwd_kernel",
            dict(la_ptr=f32, u_ptr=f32, dz_ptr=f32, dla_ptr=f32),
            dict(n=3_877_661), dict(TRAINING=training, BLOCK=cfg["BLOCK"]), cfg)))
        for node in (True, False):
            R, W = 121, 1641
            scfg = khc.sampler_config(R, W)
            consts = dict(HAS_NODE=node, TRAINING=training, BLOCK_R=scfg["BLOCK_R"],
                          BLOCK_W=scfg["BLOCK_W"])
            scal = dict(R=R, W=W, k0=123456789, k1=3, reader_offset=4000,
                        eps_low=ref.EPS_LOW, eps_high=ref.EPS_HIGH)
            n = "node" if node else "nonode"
            jobs.append((f"sample-{t}-{n}", "vector", _key(
                "hard_concrete", "_sample_masks_kernel",
                dict(ela_ptr=f32, nla_ptr=f32, m_ptr=f32, partial_ptr=f32), scal, consts, scfg)))
            jobs.append((f"sample_bwd-{t}-{n}", "vector", _key(
                "hard_concrete", "_sample_masks_bwd_kernel",
                dict(ela_ptr=f32, nla_ptr=f32, dm_ptr=f32, dsum_ptr=f32, dela_ptr=f32,
                     dnla_ptr=f32), scal, consts, scfg)))
    jobs.append(("sum_partials", "vector", _key(
        "hard_concrete", "_sum_partials_kernel",
        dict(partial_ptr=torch.float32, out_ptr=torch.float32), dict(n=26),
        dict(BLOCK=khc.PARTIALS_BLOCK), dict(num_warps=4))))
    jobs.append(("philox_words", "vector", _key(
        "philox", "_philox_words_kernel",
        dict(c0_ptr=torch.int64, c1_ptr=torch.int64, out_ptr=torch.int64),
        dict(n=5000, c2=1, c3=0, k0=7, k1=2 ** 31 + 5), dict(BLOCK=1024), dict(num_warps=4))))
    return jobs


# The readers' norms (kernels/norms.py): (name, rows, D, dtype, kind) at GPT-2
# small (36 attention readers x 32 x 64 rows of 768, fp32, LayerNorm) and
# CodeLlama-13B (120 x 8 x 72 rows of 5,120, bf16, RMSNorm) shapes, each
# dtype with the other kind too, and the widest row the kernels take.
NORM_SHAPES = [
    ("gpt2-layer", 36 * 32 * 64, 768, torch.float32, "layer"),
    ("gpt2-rms", 36 * 32 * 64, 768, torch.float32, "rms"),
    ("llama13b-rms", 120 * 8 * 72, 5120, torch.bfloat16, "rms"),
    ("llama13b-layer", 120 * 8 * 72, 5120, torch.bfloat16, "layer"),
    ("d8192-rms", 64 * 8 * 72, 8192, torch.bfloat16, "rms"),
]


def norm_jobs():
    from fastedge.kernels import norms as kn
    jobs = []
    for name, M, D, dt, kind in NORM_SHAPES:
        cfg = kn.norm_config(D, M)
        blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
        scal = dict(M=M, D=D, stride_x=D, eps=1e-5, row_blocks=cfg["ROW_BLOCKS"])
        jobs.append((f"norm_fwd-{name}", "vector", _key(
            "norms", "_norm_fwd_kernel", dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, y_ptr=dt), scal,
            dict(RMS=kind == "rms", HAS_BIAS=kind == "layer", **blocks), cfg)))
        jobs.append((f"norm_bwd-{name}", "vector", _key(
            "norms", "_norm_bwd_kernel", dict(x_ptr=dt, w_ptr=dt, dy_ptr=dt, dx_ptr=dt), scal,
            dict(RMS=kind == "rms", **blocks), cfg)))
    return jobs


# (job, compute capability): the heuristics may pick other block sizes per target
JOBS = [(job, cc) for cc in CCS for job in masked_sum_jobs(cc) + hard_concrete_jobs() + norm_jobs()]


def _job_id(name, cc):
    return f"{name}-sm{cc}"


def compile_all(processes=None) -> dict:
    """Results of every distinct compilation, by job id (name and target)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    todo = {}
    for job, cc in JOBS:
        todo.setdefault((job[2], cc), []).append(_job_id(job[0], cc))
    keys = list(todo)
    jobs = [((next(j for j, c in JOBS if j[2] == key and c == cc), cc)) for key, cc in keys]
    processes = processes or max(1, min(len(jobs), os.cpu_count() or 1))
    if processes == 1:
        results = [compile_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(compile_job, jobs))
    out = {}
    for (key, cc), res in zip(keys, results):
        for job_id in todo[(key, cc)]:
            out[job_id] = res
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_compile") / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(path)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"compile child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("job_cc", JOBS, ids=lambda jc: _job_id(jc[0][0], jc[1]))
def test_kernel_compiles_without_spills(compiled, job_cc):
    (name, kind, _), cc = job_cc
    rep = compiled[_job_id(name, cc)]
    assert rep["ok"], f"{name} does not compile for sm_{cc}:\n{rep['error']}"
    print(f"{name} sm_{cc}: {rep['registers']} registers, spills "
          f"{rep['spill_stores']}/{rep['spill_loads']} bytes")
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, (
        f"{name} on {rep['target']}: register spills\n{rep['log']}")
    if kind == "dot":
        if cc >= 90:
            assert rep["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
        else:
            assert rep["mma"], f"{name}: no mma.sync in the sm_80 PTX"


def main(argv) -> int:
    json_path = argv[argv.index("--json") + 1] if "--json" in argv else None
    results = compile_all()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f)
    else:
        for job_id, rep in results.items():
            if rep["ok"]:
                print(f"{job_id:45s} regs {rep['registers']:4d}  spills "
                      f"{rep['spill_stores']}/{rep['spill_loads']}  wgmma {rep['wgmma']!s:5s} "
                      f"mma {rep['mma']!s:5s} smem {rep['shared']}")
            else:
                print(f"{job_id:45s} FAILED: {rep['error'].splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

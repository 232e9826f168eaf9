"""Install fastedge; build the CUDA extension from csrc/ when possible.

Switches (environment variables):
  FASTEDGE_BUILD_CUDA=0     never build the extension
  FASTEDGE_BUILD_CUDA=1     build it or fail (needs a CUDA build of PyTorch and
                            nvcc in the build environment: pip install
                            --no-build-isolation -e .)
  (unset)                   build it when a CUDA build of PyTorch and a CUDA
                            toolkit are both present, else skip quietly
  FASTEDGE_CUDA_ARCHS="80;90"  target architectures (sm_80 and sm_90 by default)

fastedge imports and works without the extension; on a GPU machine it can also
be compiled just in time (fastedge.backends.cuda_backend, through ninja).
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_archs():
    raw = os.environ.get("FASTEDGE_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"FASTEDGE_CUDA_ARCHS={raw!r}: expected a list like '80;90'")
    return archs


def cuda_extension():
    mode = os.environ.get("FASTEDGE_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FASTEDGE_BUILD_CUDA={mode!r}: use 0 (skip), 1 (force) or leave unset")
    if mode == "0":
        return [], {}

    def skip(why):
        if mode == "1":
            raise SystemExit(f"FASTEDGE_BUILD_CUDA=1 but {why}")
        print(f"fastedge: not building the CUDA extension ({why})", file=sys.stderr)
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("PyTorch is not importable in the build environment "
                    "(use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip("this PyTorch is a CPU build")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit (nvcc) was found")

    gencode = []
    for arch in cuda_archs():
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="fastedge._cuda",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std: torch.utils.cpp_extension picks the standard that the
        # installed PyTorch's headers need (C++20 for recent releases, C++17
        # for older ones); csrc/ builds under both.
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastedge",
    version="0.1.0",
    description="Fast, scalable Edge Pruning: fused kernels for circuit discovery in language models",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastedge", "fastedge.ops", "fastedge.backends", "fastedge.kernels", "fastedge.tasks", "fastedge.tracr",
              "fastedge.shipped"],
    package_dir={"fastedge": "fastedge", "fastedge.kernels": "kernels"},
    package_data={"fastedge.shipped": ["*/*.json", "*/*.safetensors", "*/README.md"]},
    entry_points={"console_scripts": ["fastedge=fastedge.cli:main"]},
    install_requires=[
        # the versions the tests pass with: torch 2.13 here (CI), 2.11 on the
        # GPU machines; every Triton from 3.6 to 3.9 compiles the kernels without
        # spills for sm_80 and sm_90 (tests/test_triton_kernels_compile.py)
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "transformers",
        "numpy",
        "ninja",
        "tqdm",
        "matplotlib",   # the run report's plots (fastedge.plots), rendered to SVG without a display
    ],
    # the test extra brings Tracr too, so that the README's test command runs
    # the Tracr tests instead of skipping them
    extras_require={"test": ["pytest>=7", "pytest-xdist", "expecttest", "tracr-pypi", "pyarrow",
                             "datasets"],
                    # fastedge.tracr: compile RASP programs (tracr-pypi pulls JAX, Haiku, chex)
                    "tracr": ["tracr-pypi"],
                    # --data: parquet files, Hugging Face datasets folders (fastedge.tasks.files)
                    "parquet": ["pyarrow"],
                    "datasets": ["datasets"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Build lfvila's `lfvila_kernels._C` extension, compiled from csrc/ (the package metadata, dependencies, extras,
the `lfvila` script and the package list are in pyproject.toml's [project] table).

The CPU sources (csrc/*.cpp) are always built. The CUDA sources (csrc/*.cu) are built only where the installed
torch has CUDA and nvcc is found; otherwise the build says why it skipped them. Environment switches:

  LFVILA_SKIP_CUDA=1    never build the CUDA sources
  LFVILA_FORCE_CUDA=1   fail unless the CUDA sources are built (needs a CUDA build of torch and nvcc; no GPU needed)
  LFVILA_NO_NATIVE=1    do not compile the CPU kernels with -march=native (for wheels moved between machines)
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "9.0", i.e. sm_90)
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.stderr.write("lfvila: torch is not installed; install torch first, then build lfvila.\n")
    raise SystemExit(1)

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> tuple[bool, str]:
    if _flag("LFVILA_SKIP_CUDA"):
        return False, "LFVILA_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    if not glob.glob(os.path.join(HERE, "csrc", "*.cu")):
        return False, "no CUDA sources in csrc/"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


def _cxx_std() -> str:
    """torch >= 2.14 headers need C++20 (ATen.h says so); older ones build as C++17."""
    try:
        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return "-std=c++20"
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _cudart_library_dirs() -> list[str]:
    """Where libcudart.so is, when not in CUDA_HOME/lib64 (torch's default). torch derives CUDA_HOME from the nvcc
    on PATH, which may be a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local)."""
    roots = [CUDA_HOME or "", os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(root, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")):
                return [] if d == os.path.join(CUDA_HOME or "", "lib64") else [d]
    return []


def _extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    std = _cxx_std()
    cxx = ["-O3", "-fopenmp", std]
    if not _flag("LFVILA_NO_NATIVE") and sys.platform.startswith("linux"):
        cxx.append("-march=native")
    link = ["-fopenmp"]
    use_cuda, why = _want_cuda()
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(f"lfvila: building the CUDA kernels ({why}; archs {os.environ['TORCH_CUDA_ARCH_LIST']}; "
              f"sources {', '.join(os.path.basename(f) for f in cu_sources)})")
        nvcc = ["-O3", std, "--use_fast_math", "-lineinfo"]
        include = [os.path.join(HERE, "csrc")]
        # CUDA 13 wheels keep some headers (cccl) under site-packages/nvidia/cu13/include.
        nv_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(nv_inc):
            include.append(os.path.abspath(nv_inc))
        return [
            CUDAExtension(
                "lfvila_kernels._C",
                cpp_sources + cu_sources,
                include_dirs=include,
                library_dirs=_cudart_library_dirs(),
                extra_compile_args={"cxx": cxx + ["-DLFVILA_WITH_CUDA"], "nvcc": nvcc + ["-DLFVILA_WITH_CUDA"]},
                extra_link_args=link,
            )
        ]
    if _flag("LFVILA_FORCE_CUDA"):
        sys.stderr.write(f"lfvila: LFVILA_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}\n")
        raise SystemExit(1)
    print(f"lfvila: building the CPU kernels only ({why})")
    return [
        CppExtension(
            "lfvila_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)

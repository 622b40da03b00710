"""Compile the Triton InfoNCE kernels for sm_90 (H100) without a GPU: catches GPU-only code-path errors (the
bf16 tensor-core dots, the IEEE fp32 dots) that the interpreter never sees. Run as a script with
TRITON_INTERPRET=0; prints one line per compiled kernel variant."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lfvila_kernels.triton import info_nce as m  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
COMMON = {"n_x": "i32", "n_y": "i32", "D": "i32", "stride_x": "i32", "stride_y": "i32", "ACC": "constexpr",
          "UPCAST": "constexpr", "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_D": "constexpr"}


def main():
    # fp16 takes the bf16 path (same dots, other element type), so bf16 and fp32 cover both code paths
    for dtype, upcast, ieee in (("bf16", False, False), ("fp32", True, True)):
        bm, bn, bd, bdv, warps, stages = 64, 64, 64, 256, 8, 2
        ptr = "*" + dtype
        consts = {"ACC": tl.float32, "UPCAST": upcast, "IEEE": ieee, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
        sig = {"X": ptr, "Y": ptr, "LSE": "*fp32", "PARAMS": "*fp32", **COMMON}
        kernels = [(m._lse_kernel, sig, consts)]
        sig = {"X": ptr, "Y": ptr, "LSE_X": "*fp32", "LSE_Y": "*fp32", "DX": "*fp32", "PARAMS": "*fp32", **COMMON,
               "HAS_X": "constexpr", "HAS_Y": "constexpr", "BLOCK_DV": "constexpr"}
        for has_x, has_y in ((True, True), (False, True)):
            kernels.append((m._grad_kernel, sig, {**consts, "HAS_X": has_x, "HAS_Y": has_y, "BLOCK_DV": bdv}))
        for fn, signature, constexprs in kernels:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            k = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
            if dtype == "bf16":
                assert "mma" in k.asm["ptx"], "expected tensor-core dots for bf16"
            print(f"compiled {fn.__name__} {dtype} has_x={constexprs.get('HAS_X')} ptx={len(k.asm['ptx'])}")


if __name__ == "__main__":
    main()

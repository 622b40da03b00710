"""Compile the Triton InfoNCE kernels for sm_90 (H100) without a GPU: catches GPU-only code-path errors (the
bf16 tensor-core dots, the IEEE fp32 dots) that the interpreter never sees. Run from the repository root as
`TRITON_INTERPRET=0 python -m tests.info_nce_aot` (the module form puts the root, and so the in-tree packages, on
sys.path); prints one line per compiled kernel variant. Used by `test_triton_kernels_compile_for_sm90`."""

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lfvila_kernels.triton import info_nce as m

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
    # the chunked backend's epilogues (fp32 panels in, fp32 or 16-bit probabilities out), at the GPU tile sizes
    from lfvila_kernels.triton import info_nce_epilogue as ep

    lse_sig = {"Z": "*fp32", "LSE": "*fp32", "SCALE": "*fp32", "R": "i32", "C": "i32", "stride_z": "i32",
               "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    epilogues = [(ep._row_lse_kernel, lse_sig, {"BLOCK_R": 2, "BLOCK_C": 1024}),
                 (ep._col_lse_kernel, lse_sig, {"BLOCK_R": 16, "BLOCK_C": 256})]
    for h in ("bf16", "fp32"):
        sig = {"Z": "*fp32", "H": "*" + h, "LR": "*fp32", "LC": "*fp32", "SCALE": "*fp32", "R": "i32", "C": "i32",
               "stride_z": "i32", "stride_h": "i32", "ratio": "fp32", "SYM": "constexpr", "BLOCK_R": "constexpr",
               "BLOCK_C": "constexpr"}
        epilogues.append((ep._probs_kernel, sig, {"SYM": True, "BLOCK_R": 16, "BLOCK_C": 512}))
    for fn, signature, constexprs in epilogues:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                           options={"num_warps": 4})
        print(f"compiled {fn.__name__} ptx={len(k.asm['ptx'])}")


if __name__ == "__main__":
    main()

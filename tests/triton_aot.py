"""Compile the HTWA Triton kernels for a GPU target without a GPU: `python -m tests.triton_aot [sm]` from the
repository root (the module form puts the root, and so the in-tree packages, on sys.path).

Runs Triton's whole pipeline (AST -> TTIR -> TTGIR -> LLVM -> PTX) and the bundled ptxas for each kernel as the
launchers configure it (bf16 and fp32, with and without a bias, D = 32 and 128), so GPU-only compile errors show
up on a CPU machine, and prints ptxas's register and spill report. Must run WITHOUT TRITON_INTERPRET (the
interpreter replaces the compiled kernels). Used by the opt-in test `test_kernels_compile_for_sm90`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def main(sm: int = 90) -> int:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lfvila_kernels.triton import experimental, htwa_bwd, htwa_dbias, htwa_fwd, htwa_tiles
    from lfvila_kernels.triton import htwa_launch as tk

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels")
    target = GPUTarget("cuda", sm, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def build(fn, ptrs, consts, floats, num_warps):
        sig = {n: "constexpr" if n in consts else "*" + ptrs[n] if n in ptrs else "fp32" if n in floats else "i32"
               for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=dict(num_warps=num_warps))
        report = ""
        if os.path.exists(ptxas):
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(k.asm["ptx"])
            res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{sm}a" if sm >= 90 else f"--gpu-name=sm_{sm}",
                                  f.name, "-o", os.devnull], capture_output=True, text=True)
            os.unlink(f.name)
            report = "; ".join(x.split(":", 1)[-1].strip() for x in res.stderr.splitlines() if "Used" in x or "spill" in x)
        print(f"  {fn.__name__} (warps {num_warps}): {report}", flush=True)

    def build_tiles(q, dt, window, D, has_bias):
        """The default kernels (htwa_tiles.py: class bias tiles, dbias as a register reduction), as launched."""
        nwin = window[0] * window[1] * window[2]
        geo = dict(WH=window[1], WW=window[2], D=D, OFF64=False)
        common = dict(Q=dt, K=dt, V=dt, TILE="fp32", BOX_CLS="i32", LSE="fp32")
        cfg = tk._settings(q, window)
        build(htwa_tiles.htwa_fwd_tiles_kernel, dict(common, OUT=dt), dict(geo, HAS_BIAS=has_bias, **cfg),
              ("qk_scale",), tk._launch_kw(cfg)["num_warps"])
        cfg = tk._settings(q, window, backward=True)
        one = tk._one_tile_block(nwin, cfg["BLOCK_D"])
        grads = dict(common, OUT=dt, DOUT=dt, DQ=dt, DK=dt, DV=dt, PART="fp32", UNITS="i32", CHUNK_PTR="i32")
        if one:
            block = one * tk._one_tile_pack(one)
            build(htwa_tiles.htwa_bwd_one_tile_kernel, grads,
                  dict(geo, HAS_BIAS=has_bias, UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"], BLOCK=block, WB=one,
                       BLOCK_D=cfg["BLOCK_D"]), ("scale", "qk_scale"), tk._tile_warps(block, cfg["BLOCK_D"]))
            return
        nw = tk._launch_kw(cfg, backward=True)["num_warps"]
        consts = dict(geo, HAS_BIAS=has_bias, **cfg)
        build(htwa_tiles.htwa_bwd_dq_tiles_kernel, dict(common, OUT=dt, DOUT=dt, DELTA="fp32", DQ=dt), consts,
              ("scale", "qk_scale"), nw)
        build(htwa_tiles.htwa_bwd_dkdv_tiles_kernel, dict(common, DOUT=dt, DELTA="fp32", DK=dt, DV=dt), consts,
              ("scale", "qk_scale"), nw)
        if has_bias:
            block_s = tk._dssum_block(cfg, nwin)
            build(htwa_tiles.htwa_bwd_dssum_tiles_kernel,
                  dict(common, DOUT=dt, DELTA="fp32", PART="fp32", UNITS="i32", CHUNK_PTR="i32"),
                  dict(geo, UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"], BLOCK_M=block_s, BLOCK_N=block_s,
                       BLOCK_D=cfg["BLOCK_D"]),
                  ("qk_scale",), tk._tile_warps(block_s, cfg["BLOCK_D"]))

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dt, window, bias_window, D, has_bias in [("bf16", (32, 3, 5), (32, 3, 5), 32, True),
                                                 ("bf16", (2, 3, 5), (2, 3, 5), 32, True),
                                                 ("bf16", (4, 3, 5), (4, 3, 5), 32, True),
                                                 ("bf16", (16, 3, 5), (16, 3, 5), 32, False),
                                                 ("bf16", (2, 3, 5), (2, 3, 5), 32, False),
                                                 ("fp32", (2, 3, 5), (4, 3, 5), 32, True),
                                                 ("bf16", (4, 3, 5), (4, 3, 5), 128, True)]:
        print(dt, "window", window, "bias_window", bias_window, "D", D, "bias", has_bias, flush=True)
        q = torch.empty(1, 1, 1, 1, 1, D, dtype=dtypes[dt])
        build_tiles(q, dt, window, D, has_bias)
        for backward in (False, True):
            cfg = tk._settings(q, window, backward=backward)
            nw = tk._launch_kw(cfg, backward=backward)["num_warps"]
            consts = dict(WH=window[1], WW=window[2], BH=bias_window[1], BW=bias_window[2], HAS_BIAS=has_bias, **cfg)
            common = dict(Q=dt, K=dt, V=dt, BIAS="fp32", LSE="fp32")
            if not backward:
                build(htwa_fwd.htwa_fwd_kernel, dict(common, OUT=dt), consts, ("qk_scale",), nw)
            else:
                build(htwa_bwd.htwa_bwd_dq_kernel, dict(common, OUT=dt, DOUT=dt, DELTA="fp32", DQ=dt, PART="fp32",
                                                         UNITS="i32", CHUNK_PTR="i32"), dict(consts, DBIAS=has_bias),
                      ("scale", "qk_scale"), nw)
                build(htwa_bwd.htwa_bwd_dkdv_kernel, dict(common, DOUT=dt, DELTA="fp32", DK=dt, DV=dt), consts,
                      ("scale", "qk_scale"), nw)
                if has_bias:  # the dbias workspace's own kernel (opt-in, TUNE["dbias_kernel"])
                    dconsts = {k: v for k, v in consts.items() if k != "HAS_BIAS"}
                    build(experimental._htwa_bwd_dbias_kernel, dict(common, DOUT=dt, DELTA="fp32", PART="fp32",
                                                                    UNITS="i32", CHUNK_PTR="i32"),
                          dconsts, ("qk_scale",), nw)
                nwin = window[0] * window[1] * window[2]
                if nwin <= experimental.SMALL_BOX_MAX and D <= 64:  # the one-kernel backward (opt-in, TUNE["small_fused"])
                    small = dict(WH=window[1], WW=window[2], BH=bias_window[1], BW=bias_window[2],
                                 HAS_BIAS=has_bias, UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"],
                                 BLOCK=max(16, triton.next_power_of_2(nwin)), BLOCK_D=cfg["BLOCK_D"])
                    ptrs = dict(common, OUT=dt, DOUT=dt, DQ=dt, DK=dt, DV=dt, PART="fp32", UNITS="i32",
                                CHUNK_PTR="i32")
                    build(experimental._htwa_bwd_small_kernel, ptrs, small, ("scale", "qk_scale"), 4)
    build(htwa_dbias.chunk_sum_kernel, dict(PART="fp32", OUT="fp32"), dict(BLOCK=512), (), 4)
    build(htwa_dbias.dbias_gather_kernel, dict(DENSE="fp32", ROW_PTR="i32", PAIRS="i32", DBIAS="fp32"),
          dict(BLOCK_R=32, BLOCK_J=32), (), 4)
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))

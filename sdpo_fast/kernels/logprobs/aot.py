"""Compile the log-prob kernels ahead of time for Hopper (sm_90) without a GPU, and report.

    python -m sdpo_fast.kernels.logprobs.aot [--check]      # run without TRITON_INTERPRET

Uses the ptxas / cuobjdump inside the triton wheel. The kernels are compiled with the CUDA default
blocks (``triton.Options``: 128 x 128 x 64, 8 warps, 3 stages; bf16) and the divisibility-by-16 hints the JIT gives at
run time (pointers, D, strides). Reported per kernel: shared memory, registers, stack bytes, and the
PTX's global loads and matrix instructions; ``--check`` fails unless the two GEMM-like kernels use
16-byte ``cp.async`` loads and ``wgmma`` with no stack (spill) bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ..options import defaults

_HINTED = ("D", "V", "v0", "n_cols", "stride_h", "stride_w", "stride_out", "stride_x")  # D = 4096, V = 128256, S = k * 128


def _kernels():
    from . import triton as lp

    d = defaults(lp.Options)
    _BLOCKS = dict(BLOCK_M=d["block_m"], BLOCK_V=d["block_v"], BLOCK_D=d["block_d"])
    p16, pf, pi = "*bf16", "*fp32", "*i64"
    lse_sig = dict(h_ptr=p16, w_ptr=p16, rows_ptr=pi, m_ptr=pf, s_ptr=pf, x_ptr=pf, Nr="i32", V="i32", D="i32",
                   stride_h="i32", stride_w="i32", tiles_per_split="i32")
    dl_sig = dict(h_ptr=p16, w_ptr=p16, rows_ptr=pi, x_ptr=pf, lse_ptr=pf, g_row_ptr=pf, row_ptr_ptr=pi, t_ids_ptr=pi,
                  g_t_ptr=pf, out_ptr=p16, Nr="i32", V="i32", D="i32", v0="i32", n_cols="i32", stride_h="i32",
                  stride_w="i32", stride_out="i32")
    from . import cublas as cb

    row_opts = dict(num_warps=defaults(cb.Options)["num_warps"], num_stages=1)
    row_block = dict(BLOCK=defaults(cb.Options)["block"])
    rows = [
        (cb._row_lse_kernel, dict(x_ptr=p16, lse_ptr=pf, V="i32", stride_x="i32"), row_block, False, row_opts),
        (cb._row_grad_kernel, dict(x_ptr=p16, lse_ptr=pf, g_row_ptr=pf, row_ptr_ptr=pi, t_ids_ptr=pi, g_t_ptr=pf,
                                   row0="i32", V="i32", stride_x="i32"), row_block, False, row_opts),
    ]
    return [(*k, None) for k in [
        (lp._lse_kernel, lse_sig, dict(_BLOCKS, PREC="tf32", STORE=False), True),
        (lp._lse_kernel, lse_sig, dict(_BLOCKS, PREC="tf32", STORE=True), True),
        (lp._target_kernel, dict(h_ptr=p16, w_ptr=p16, rows_ptr=pi, t_rows_ptr=pi, t_ids_ptr=pi, t_cands_ptr=pi,
                                 lse_ptr=pf, out_ptr=pf, N="i32", D="i32", stride_h="i32", stride_w="i32"),
         dict(BLOCK_T=d["block_t"], BLOCK_D=d["block_d"]), False),
        (lp._dlogits_kernel, dl_sig, dict(_BLOCKS, GROUP_M=d["group_m"], PREC="tf32", STORED=False), True),
        (lp._dlogits_kernel, dl_sig, dict(_BLOCKS, GROUP_M=d["group_m"], PREC="tf32", STORED=True), False),
    ]] + rows


def lp_defaults() -> dict:
    from . import triton as lp

    return defaults(lp.Options)


def compile_report(arch: int = 90) -> list[dict]:
    """One dict per kernel: name, shared (bytes), regs, stack, ops (PTX opcode counts), gemm (bool)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1 (the interpreter does not compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", arch, 32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for fn, sig, const, gemm, launch in _kernels():
            names = list(sig) + list(const)
            hinted = [n for n, t in sig.items() if t.startswith("*") or n in _HINTED]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}
            full_sig = dict(sig, **{k: "constexpr" for k in const})
            d = lp_defaults()
            launch = launch or dict(num_warps=d["num_warps"], num_stages=d["num_stages"])
            k = triton.compile(ASTSource(fn, full_sig, const, attrs), target=target, options=launch)
            ops = re.findall(r"^\s*(?:@%p\d+\s+)?([a-z][a-z0-9_.:]+)", k.asm["ptx"], re.M)
            counts = Counter(o for o in ops if o.startswith(("ld.global", "cp.async.cg", "cp.async.ca", "wgmma.mma", "mma.")))
            regs = stack = None
            if cuobjdump.exists():
                cubin = Path(tmp) / f"{fn.__name__}.cubin"
                cubin.write_bytes(k.asm["cubin"])
                res = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
                m = re.search(r"REG:(\d+) STACK:(\d+)", res)
                if m:
                    regs, stack = int(m.group(1)), int(m.group(2))
            flags = "".join(f" {k}" for k in ("STORE", "STORED") if const.get(k))
            out.append(dict(name=fn.__name__ + flags, shared=k.metadata.shared, regs=regs, stack=stack, ops=dict(counts), gemm=gemm))
    return out


def markdown(report: list[dict], arch: int = 90) -> str:
    lines = [f"| kernel | shared B | registers / stack | PTX loads and MMA (sm_{arch}, bf16) |", "|---|---|---|---|"]
    for r in report:
        lines.append(f"| {r['name']} | {r['shared']} | {r['regs']} / {r['stack']} | "
                     + ", ".join(f"{n} x{c}" for n, c in sorted(r["ops"].items())) + " |")
    return "\n".join(lines) + "\n"


def aot_report(arch: int = 90) -> str:
    """Markdown table of ``compile_report``."""
    return markdown(compile_report(arch), arch)


def check(report: list[dict]) -> list[str]:
    """Problems: GEMM-like kernels without 16-byte cp.async or wgmma, any stack bytes, shared > 227 KiB."""
    problems = []
    for r in report:
        if r["gemm"] and not any(o.startswith("wgmma.mma_async") for o in r["ops"]):
            problems.append(f"{r['name']}: no wgmma")
        if r["gemm"] and not any(o.startswith("cp.async.cg") for o in r["ops"]):
            problems.append(f"{r['name']}: no 16-byte cp.async loads")
        if r["stack"]:
            problems.append(f"{r['name']}: {r['stack']} stack bytes (spills)")
        if r["shared"] > 227 * 1024:
            problems.append(f"{r['name']}: {r['shared']} bytes of shared memory")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--check", action="store_true", help="exit 1 on missing wgmma / cp.async or on spills")
    args = ap.parse_args(argv)
    report = compile_report(args.arch)
    print(markdown(report, args.arch))
    if args.check:
        problems = check(report)
        for p in problems:
            print("PROBLEM:", p)
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

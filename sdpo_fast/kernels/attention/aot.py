"""Compile the shared-prefix attention kernels for a CUDA target without a GPU and report their resources.

For each kernel and head dim: registers per thread, stack (spill) bytes, shared memory, and the count of
Hopper matrix instructions (``HGMMA``) and local-memory loads (``LDL``) in the SASS. It uses the ptxas
and cuobjdump that ship inside the triton wheel, so it runs on a CPU-only machine; it is how the CUDA
defaults of ``AttentionConfig`` were chosen (largest blocks without spills).

    python -m sdpo_fast.kernels.attention.aot                    # defaults, bf16, Dh 64 80 96 128, sm_90
    python -m sdpo_fast.kernels.attention.aot --head-dims 128 --fwd 128 128 8 2

Strides are compiled as multiples of 16, which is what Triton's JIT specialises them to at run time for
the usual ``H * Dh`` strides; without that hint the loads are not vectorised, not pipelined and spill.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from . import triton as kernels
from .launch import AttentionConfig, default_config

_TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = f"*{dtype}"
        elif name in ("LSE2", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("CAND", "TILES"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_report(fn, dtype: str, head_dim: int, block_m: int, block_n: int, warps: int, stages: int,
                   h_per_kv: int = 4, capability: int = 90) -> dict:
    """Compile ``fn`` for ``sm_<capability>`` and return its resource usage."""
    constexprs = dict(H_PER_KV=h_per_kv, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                      BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC="ieee" if dtype == "fp32" else "tf32")
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n in _TENSORS or n in ("LSE2", "DELTA", "CAND", "TILES") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs, attrs=aligned)
    compiled = triton_compile(src, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split(":") for line in usage.splitlines() if "REG:" in line for tok in line.split() if ":" in tok)
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]), shared=compiled.metadata.shared,
                hgmma=sass.count("HGMMA"), ldl=sass.count("LDL"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 80, 96, 128])
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--h-per-kv", type=int, default=4)
    for k in ("fwd", "dq", "dkdv"):
        p.add_argument(f"--{k}", type=int, nargs=4, metavar=("M", "N", "WARPS", "STAGES"),
                       help=f"override the {k} kernel's blocks (queries, keys), warps and stages")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel spills or has no HGMMA")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    bad = []
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print("| Dh | kernel | M | N | warps | stages | registers | stack | shared | HGMMA | LDL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dh in args.head_dims:
        import torch

        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        cfg: AttentionConfig = default_config(dh, torch.device("cuda"), torch_dtype)
        plans = {
            "fwd": (kernels.shared_prefix_fwd_kernel, cfg.fwd_m, cfg.fwd_n, cfg.fwd_warps, cfg.fwd_stages),
            "dq": (kernels.shared_prefix_bwd_dq_kernel, cfg.dq_m, cfg.dq_n, cfg.dq_warps, cfg.dq_stages),
            "dkdv": (kernels.shared_prefix_bwd_dkdv_kernel, cfg.dkdv_m, cfg.dkdv_n, cfg.dkdv_warps, cfg.dkdv_stages),
        }
        for name, (fn, m, n, w, s) in plans.items():
            if getattr(args, name):
                m, n, w, s = getattr(args, name)
            r = compile_report(fn, args.dtype, dh, m, n, w, s, args.h_per_kv, args.capability)
            print(f"| {dh} | {name} | {m} | {n} | {w} | {s} | {r['registers']} | {r['stack']} | {r['shared']} | "
                  f"{r['hgmma']} | {r['ldl']} |", flush=True)
            if r["stack"] or r["ldl"] or (args.capability == 90 and not r["hgmma"]):
                bad.append(f"Dh={dh} {name}")
    if args.check and bad:
        print(f"spills or no HGMMA: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

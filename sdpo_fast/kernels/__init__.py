"""The ground floor of sdpo_fast, installed as ``sdpo_fast.kernels``: one folder per op, the torch
reference beside its kernels. Modules here import torch, triton and each other, never the package
above them (the backend table in ``sdpo_fast/backends.py`` imports them lazily).

    logprobs/    fused lm_head + log-softmax + gather + per-candidate sum, forward and gradient pass
        reference.py   the "torch" backend and the backend contract every other one follows
        triton.py      the "triton" backend (fully fused Triton kernels)
        cublas.py      the "cublas" backend (library GEMMs + Triton row kernels)
        native.py      the "native" backend: the Python side of the csrc/ CPU ops
        aot.py         sm_90 compiler report of the Triton kernels (no GPU needed)
    attention/   shared-prefix attention
        reference.py   the "torch" backend
        triton.py      the Triton kernels; launch.py their launchers and tile tables; aot.py the report
        NOTES.md       working notes
    options.py   the typed backend options and their one validator
    extension.py loads the compiled csrc/ extension (sdpo_fast.kernels._native)
"""

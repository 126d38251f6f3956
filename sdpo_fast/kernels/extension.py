"""Loads the compiled C++ CPU extension (csrc/) that the ``"native"`` backend runs on.

The extension ``sdpo_fast.kernels._native`` is compiled by ``setup.py`` when torch is importable at
install time (``pip install --no-build-isolation -e .``, what ``.ci/run`` does). Otherwise (a plain
``pip install -e .`` builds in an isolated environment without torch) it is compiled on first use with
``torch.utils.cpp_extension.load`` from the checkout's ``csrc/`` (or the copy installed as
``sdpo_fast/_csrc``) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); that takes about a minute once. A prebuilt extension wins over the JIT
build: after editing csrc/ rebuild it (``python setup.py build_ext --inplace`` or reinstall).
``SDPO_FAST_NO_EXT=1`` skips both. When no extension can be had, importing this module raises
ImportError with the reason; the backend table turns it into one warning and ``"auto"`` uses ``"torch"``.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["SOURCES", "extension", "gemm_engine"]

# csrc/: the common header, one file per op, the bindings (setup.py compiles the same list).
SOURCES = ("gemm.cpp", "rowops.cpp", "logprobs.cpp", "sdpo_loss.cpp", "bindings.cpp")
# The copy installed as sdpo_fast/_csrc (setup.py), else the checkout's csrc/ beside sdpo_fast/ (editable installs).
_PACKAGE = Path(__file__).resolve().parent.parent
_CSRC = next((d for d in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc") if (d / SOURCES[-1]).is_file()),
             _PACKAGE.parent / "csrc")
_PKG = __name__.split(".")[0]  # the installed package name, for messages and the JIT cache name
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]


def _jit_build():
    """Compile csrc/ with torch's JIT extension builder (cached; rebuilt when a source changes)."""
    if not all((_CSRC / s).is_file() for s in SOURCES):
        raise ImportError(f"no prebuilt extension and no C++ sources at {_CSRC} to compile")
    from torch.utils import cpp_extension

    # ninja from the environment's scripts folder, also when the venv is not activated
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    name = f"{_PKG}_native"
    try:  # private helper, only for the progress note
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        fresh = not os.path.exists(os.path.join(build_dir, f"{name}.so"))
    except Exception:  # noqa: BLE001
        build_dir, fresh = "torch's extension directory", True
    if fresh:
        print(f"{_PKG}: compiling the native CPU extension into {build_dir} (once, about a minute)", file=sys.stderr)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            verbose=False,
        )
    except Exception as exc:  # compiler missing or failing: report, do not crash the package
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError(f"compiling csrc/ failed: {first}") from exc


def _load():
    if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
        raise ImportError("native CPU extension skipped (SDPO_FAST_NO_EXT is set); using the torch backend")
    try:
        from . import _native  # built at install time by setup.py

        return _native
    except ImportError:
        pass
    try:
        return _jit_build()
    except ImportError as exc:
        raise ImportError(f"native CPU extension not built ({exc}); using the torch backend") from exc


extension = _load()


def gemm_engine(work: int | None = None) -> str:
    """The library (``"onednn"`` or ``"blas"``) an op call runs its GEMMs on now, for a call whose GEMM
    passes cost ``work`` multiply-adds (logit rows x V x D; default: a large one). Smaller calls than
    ``2**28`` always use the BLAS: oneDNN compiles a kernel per new shape, which they never earn back."""
    return extension.gemm_engine(1 << 62 if work is None else int(work))

"""Build script: the package ``sdpo_fast`` (its ground floor ``sdpo_fast/kernels``: one subpackage per op;
never a top-level ``kernels`` folder, which would shadow transformers' ``kernels`` dependency whenever
the checkout's root is on ``sys.path``), and csrc/ compiles into the ``sdpo_fast.kernels._native`` CPU
extension (loaded by ``sdpo_fast/kernels/extension.py``).

The extension is built with torch's extension builder (ninja) against the torch that is importable
here, so it is only built when the build can see the installed torch: ``pip install
--no-build-isolation ...`` (``.ci/run`` does this). Under pip's default build isolation torch is not
importable (and must not be, or pip would fetch a multi-GB CUDA wheel into the isolated environment);
the package then installs without it and ``sdpo_fast/kernels/extension.py`` compiles the same sources on first use.
``SDPO_FAST_NO_EXT=1`` skips the build. A failing compiler never fails the install: the package
imports and the ``"auto"`` backend falls back to torch with one warning.
"""

import os
import sys

from setuptools import setup

# csrc/ also ships as sdpo_fast/_csrc (sources only), so that an install without the prebuilt
# extension (a wheel built without torch in sight, a non-editable install) can still compile it on
# first use.
PACKAGES = dict(
    packages=["sdpo_fast", "sdpo_fast.data", "sdpo_fast.eval", "sdpo_fast.kernels", "sdpo_fast.kernels.logprobs",
              "sdpo_fast.kernels.attention", "sdpo_fast._csrc"],
    package_dir={"sdpo_fast": "sdpo_fast", "sdpo_fast._csrc": "csrc"},
    package_data={"sdpo_fast._csrc": ["*.cpp", "*.h"]},
)


def _native_extension():
    """``(ext_modules, cmdclass)`` for sdpo_fast.kernels._native, or empty when it is not to be built."""
    if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
        print("sdpo_fast: SDPO_FAST_NO_EXT is set; not building the native CPU extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "sdpo_fast: torch is not importable in this build environment; the native CPU extension will be "
            "compiled on first use instead (install with --no-build-isolation to build it now)",
            file=sys.stderr,
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension, but a compiler failure only prints a warning."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure leaves the torch backend
                print(f"sdpo_fast: building the native CPU extension failed ({exc}); "
                      "the torch backend will be used", file=sys.stderr)

    ext = CppExtension(
        name="sdpo_fast.kernels._native",
        # the list sdpo_fast/kernels/extension.py compiles on first use (SOURCES there)
        sources=["csrc/gemm.cpp", "csrc/rowops.cpp", "csrc/logprobs.cpp", "csrc/sdpo_loss.cpp", "csrc/bindings.cpp"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _native_extension()
setup(**PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)

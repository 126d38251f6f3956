"""Build script: the Triton kernels in ./kernels ship as ``sdpo_fast.kernels`` (never a top-level
``kernels`` module)."""

from setuptools import setup

setup(
    packages=["sdpo_fast", "sdpo_fast.kernels"],
    package_dir={"sdpo_fast": "sdpo_fast", "sdpo_fast.kernels": "kernels"},
)

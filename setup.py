"""Builds the optional fused optimizer kernels; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            # A plain shared library loaded with ctypes (workers/nn/optimizers.py); when no C
            # compiler is at hand the build is skipped and the numpy kernels run instead.
            "workers.nn._fused",
            sources=["workers/nn/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)

"""TEST-ONLY: sgl_kernel.mamba names, all unavailable."""

from sgl_kernel._missing import __getattr__  # noqa: F401

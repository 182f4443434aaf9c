"""TEST-ONLY: sgl_kernel.kvcacheio names, all unavailable."""

from sgl_kernel._missing import __getattr__  # noqa: F401

"""TEST-ONLY: sgl_kernel.flash_attn names, all unavailable."""

from sgl_kernel._missing import __getattr__  # noqa: F401

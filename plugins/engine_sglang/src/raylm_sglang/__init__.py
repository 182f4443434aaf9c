"""raylm's `sglang` engine (not implemented yet)."""

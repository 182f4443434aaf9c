"""raylm's `vllm` engine."""

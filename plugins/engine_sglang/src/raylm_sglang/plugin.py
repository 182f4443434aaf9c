"""Hook implementations of raylm-sglang. Imports nothing heavy."""

import raylm


@raylm.hookimpl
def raylm_engines():
    from raylm_sglang.engine import SGLangEngine

    yield raylm.EngineSpec(
        name="sglang",
        description="SGLang's OpenAI server in each replica",
        engine_class=SGLangEngine,
        requires=(raylm.Requirement("sglang", "pip install 'raylm-sglang[sglang]'"),),
    )

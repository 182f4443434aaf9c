"""Names SGLang imports from sgl_kernel but a CPU Llama never calls."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel stand-in (tests only): {name} is not implemented")

    unavailable.__name__ = name
    return unavailable

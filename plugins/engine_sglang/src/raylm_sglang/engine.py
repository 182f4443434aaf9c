"""The SGLang engine. Its spec is marked unavailable, so raylm never calls these yet."""

from raylm.engine import Engine, ReplicaResources


class SGLangEngine(Engine):
    def validate(self) -> None:
        raise NotImplementedError("the sglang engine is not implemented yet")

    def resources(self) -> ReplicaResources:
        raise NotImplementedError("the sglang engine is not implemented yet")

    async def start(self, host: str) -> str:
        raise NotImplementedError("the sglang engine is not implemented yet")

    async def check_health(self) -> None:
        raise NotImplementedError("the sglang engine is not implemented yet")

    async def stop(self) -> None:
        return None

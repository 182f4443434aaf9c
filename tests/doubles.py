"""Do-nothing Engine and Backend classes: the spec and loader tests need classes to point at, not behaviour."""

from raylm import Backend, ClusterStatus, Engine, ReplicaResources


class NullEngine(Engine):
    def validate(self):
        pass

    def resources(self):
        return ReplicaResources()

    async def start(self, host):
        raise NotImplementedError

    async def check_health(self):
        pass

    async def stop(self):
        pass


class NullBackend(Backend):
    def up(self, progress):
        return ClusterStatus("null", self.cluster_name, "127.0.0.1:1")

    def status(self):
        return None

    def down(self, progress):
        pass

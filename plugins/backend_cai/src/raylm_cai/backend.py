"""The CML backend. Its spec is marked unavailable, so raylm never calls these yet."""

from raylm.backend import Backend, ClusterStatus, Progress


class CAIBackend(Backend):
    def up(self, progress: Progress) -> ClusterStatus:
        raise NotImplementedError("the cai backend is not implemented yet")

    def status(self) -> ClusterStatus | None:
        raise NotImplementedError("the cai backend is not implemented yet")

    def down(self, progress: Progress) -> None:
        raise NotImplementedError("the cai backend is not implemented yet")

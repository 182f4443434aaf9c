"""The router on a thread of its own, listening on a free port: what the router tests drive."""

from raylm.net import free_port
from raylm.serving.router_thread import RouterThread


class Routing(RouterThread):
    """raylm's router thread, as a context manager listening on a free port."""

    def __init__(self, expected_models, **router_options):
        super().__init__(expected_models, **router_options)
        self.port = free_port()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.start("127.0.0.1", self.port)
        return self

    def __exit__(self, *exc):
        self.stop()

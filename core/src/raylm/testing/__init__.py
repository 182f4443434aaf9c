"""Test support shipped with raylm, for our plugins and third-party ones.

- `raylm.testing.fixtures`: pytest fixtures; enable with `pytest_plugins = ["raylm.testing.fixtures"]`.
- `raylm.testing.contracts`: `EngineContract` and `BackendContract`, test classes to subclass.
- `raylm.testing.models`: tiny real models built offline (`python -m raylm.testing.models DIR`).
- `raylm.testing.processes`: find processes a test left behind.
"""

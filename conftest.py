"""Root conftest: raylm's own pytest fixtures for every test folder of the workspace."""

pytest_plugins = ["raylm.testing.fixtures"]

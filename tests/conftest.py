"""Shared pytest fixtures. The real-stack fixtures live in tests/stack_fixtures.py."""

pytest_plugins = ["tests.stack_fixtures"]

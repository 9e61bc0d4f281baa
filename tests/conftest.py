"""Shared pytest fixtures: each area keeps its fixtures in its own plugin module."""

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_models", "tests.fixtures_s3"]

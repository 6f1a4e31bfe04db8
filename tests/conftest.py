"""Shared by all tests: every test reads the settings afresh from its own environment."""

import pytest

from vq_tasks.settings import get_settings


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()

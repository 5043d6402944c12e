"""The browser lane's fixtures and hooks: all in ``tests/browser_fixtures.py`` (its docstring says what they are)."""

from browser_fixtures import *  # noqa: F401,F403 - fixtures and hooks are found by name

"""Registers the shared fixtures (:mod:`tests.fixtures`) for every test, and pytester, with which
tests/harness/test_broker.py runs the broker fixture in a child session to see it fail rather than skip."""

pytest_plugins = ["pytester", "tests.fixtures"]

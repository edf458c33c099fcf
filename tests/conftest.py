import os

import pytest


def pytest_collection_modifyitems(config, items):
    """Heavy tests run only with ENGINE_HEAVY_TESTS=1 so that CI on 2 cores stays well under its budget; every
    module keeps fast tests of the same code in the default run."""
    if os.environ.get("ENGINE_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set ENGINE_HEAVY_TESTS=1 to run it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)

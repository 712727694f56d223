"""The scripts under examples/, imported as modules the way they import
each other (from their own folder): `example_module("benchmark")`."""

import importlib
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def example_module(name):
    """examples/<name>.py, imported as a module."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)

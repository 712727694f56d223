"""The article's model for the tests, from the examples' shared module (one definition).

Run as scripts from this folder (tests/_backend_worker.py,
tests/test_article_model.py) or under pytest, both of which put it on
sys.path, the tests import it as `from article import article_model`:
`article_model(bn, filters=32)`, the article's model with the layer `bn` as
its BatchNormalization, uncompiled.
"""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "_common.py"
_spec = importlib.util.spec_from_file_location("_examples_common", _PATH)
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)

article_model = _common.article_model

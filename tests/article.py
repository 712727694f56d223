"""The article's model for the tests, from the examples' shared module (one definition).

Run as scripts from this folder (tests/_backend_worker.py,
tests/test_article_model.py) or under pytest, both of which put it on
sys.path, the tests import it as `from article import article_model`:
`article_model(bn, filters=32)`, the article's model with the layer `bn` as
its BatchNormalization, uncompiled. examples/_common.py is imported the way
the examples import it (as `_common`, see example_scripts.py), so that it is
one module whichever test reaches it first.
"""

from example_scripts import example_module

article_model = example_module("_common").article_model

"""The article's model, for the tests: one definition instead of one per file.

Run as scripts from this folder (tests/_backend_worker.py,
tests/test_article_model.py) or under pytest, both of which put it on
sys.path, the tests import it as `from article import article_model`.
"""

import keras


def article_model(bn, filters=32):
    """The article's model, verbatim but for the BatchNormalization line
    (`bn`, a layer instance), uncompiled. `filters` shrinks the Conv2D where
    a test only needs the shape of the model, not its accuracy."""
    return keras.Sequential(
        [
            keras.layers.InputLayer(shape=(28, 28, 1)),
            keras.layers.Conv2D(filters, (3, 3), activation="relu"),
            bn,
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )

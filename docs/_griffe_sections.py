"""Griffe extension: Keras' "Call arguments:" section as a table of arguments.

Keras' docstrings list a layer's call arguments under "Call arguments:",
which the Google style does not know: it would render as a note holding
one run-on paragraph. Read as an "Other parameters" section titled "Call
arguments", it gets the same table as "Args:". The docstrings keep Keras'
wording, which `help()` and IDEs show.
"""

import re

import griffe

_CALL_ARGUMENTS = re.compile(r"^Call arguments:$", re.MULTILINE)


class CallArguments(griffe.Extension):
    def on_class_instance(self, *, cls, **kwargs):
        if cls.docstring is not None:
            cls.docstring.value = _CALL_ARGUMENTS.sub(
                "Other parameters: Call arguments:", cls.docstring.value
            )

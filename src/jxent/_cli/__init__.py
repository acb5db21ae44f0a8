"""The ``jxent`` command: ``jxent demo`` (and ``demo lm``), ``jxent check``, ``jxent curvature``.

``_main`` builds the parser and runs a command; ``_base`` is what every command shares (flag
types, loading a user's model, one-line messages for missing extras and user code that cannot
run); each command is a module of its own. Commands import ``_base`` only, never ``_main``.
"""

from jxent._cli._main import main

__all__ = ["main"]

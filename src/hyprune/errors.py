"""One exception type for every problem a user can fix.

The CLI prints a ``HypruneError`` as a short message and exits with code 2, without a traceback:
the message must say what was wrong, what was expected and how to fix it.
"""


class HypruneError(Exception):
    """A problem with the user's input (model, data, target, plan, paths)."""

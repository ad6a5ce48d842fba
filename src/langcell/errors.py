"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations


class LangCellError(ValueError):
    """A problem with the user's input, files or settings.

    The message always names the problem *and* the fix, in one or two sentences, so that the CLI can
    print it on one line and exit non-zero without a traceback. It subclasses :class:`ValueError` so
    that code written against plain Python conventions still catches it.
    """

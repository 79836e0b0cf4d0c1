"""The one exception type users see for their own mistakes."""


class EMLoCError(ValueError):
    """A problem the caller can fix (bad settings, bad demos, wrong model or file).

    The message says what was wrong and how to fix it.
    """

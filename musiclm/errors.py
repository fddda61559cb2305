"""The one exception type that reaches the user as a sentence instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, an option, a config, a corpus.

    The CLI prints ``str(error)`` on one line and exits with code 2. The message
    says what was wrong and what to do about it.
    """

"""The one exception type that reaches the user as a sentence instead of a traceback.

Layer: base.
"""

_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(Exception):
    """Bad input from the user: a path, an option, a config, a corpus.

    The CLI prints ``str(error)`` on one line and exits with code 2. The message
    says what was wrong and what to do about it.

    Raised inside a DataLoader worker, the error comes back re-raised by torch as
    its type called with one message that holds the worker's whole traceback;
    the sentence (the traceback's last line, after the type's name) is kept.
    """

    def __init__(self, message: object = ""):
        text = str(message)
        if _WORKER_TRACEBACK in text:
            last = text.rstrip().splitlines()[-1]
            text = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(text)


class Stopped(Exception):
    """A run stopped by SIGINT or SIGTERM, after it cleaned up. The CLI prints ``str(error)`` on one
    line (no ``error:`` prefix: nothing went wrong) and exits with :attr:`exit_code`, 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)

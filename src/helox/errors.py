"""User-facing errors: one clear message, what is wrong and how to fix it, no traceback."""


class HeloxError(Exception):
    """An error caused by the user's input or environment, reported by the CLI without a traceback.

    `hint` says how to fix it; the CLI prints it after the message and exits non-zero.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  fix: {self.hint}"

"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 2."""


class SurgeonError(Exception):
    """A problem with the user's input or request; the message names the problem and the fix."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line, for quoting inside a SurgeonError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

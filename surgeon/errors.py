"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 2."""


class SurgeonError(Exception):
    """A problem with the user's input or request; the message names the problem and the fix."""

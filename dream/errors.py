"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class DreamError(Exception):
    """Bad input or configuration, described in one line that names what is wrong."""

"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class DreamError(Exception):
    """Bad input or configuration, described in one line that names what is wrong."""


def option_error(field: str, wanted: str, value) -> DreamError:
    """"--lambda-max must be in [0, 1], got 1.2": a config field named as its command-line flag."""
    return DreamError(f"--{field.replace('_', '-')} must be {wanted}, got {value!r}")

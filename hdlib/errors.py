"""One exception type per kind of user mistake, so callers can catch them and
notebooks show a one-line message instead of a deep traceback."""


class HDLibError(Exception):
    """Base class for every error hdlib raises on bad user input."""


class ConfigError(HDLibError, ValueError):
    """A parameter file or override is wrong (names the file and key)."""


class DataError(HDLibError, ValueError):
    """A dataset, image or class is missing, empty or unreadable (names the path or class)."""


def one_line_errors(main):
    """Decorate a command-line `main(argv) -> int`: a user mistake prints one line
    (`error: ...`) and exits 2 instead of a traceback."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except HDLibError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper

"""One exception type per kind of user mistake, so callers can catch them and
notebooks show a one-line message instead of a deep traceback."""


class HDLibError(Exception):
    """Base class for every error hdlib raises on bad user input."""


class ConfigError(HDLibError, ValueError):
    """A parameter file or override is wrong (names the file and key)."""


class DataError(HDLibError, ValueError):
    """A dataset, image or class is missing, empty or unreadable (names the path or class)."""

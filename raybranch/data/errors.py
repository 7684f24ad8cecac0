"""Errors of the data package; each message is one line naming the bad input."""
from raybranch.errors import RaybranchError


class DataError(RaybranchError, ValueError):
    """A bad data set name, split spec, fraction or slicing request."""


class DatasetNotFoundError(RaybranchError, FileNotFoundError):
    """A data set's files are missing from the data directory."""

"""Typed errors for everything that comes over the wire or from a file a user can swap.

Callers catch ``ProtocolError`` to reject a message and carry on; each subclass says why.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A message or file was rejected. The message text says what and why."""


class VersionError(ProtocolError):
    """The protocol version is not one this build speaks."""


class SchemaError(ProtocolError):
    """The message decoded but does not match its schema (unknown kind, missing/extra/bad field)."""


class TruncatedError(ProtocolError):
    """The payload ended early or is not a complete encoded message."""


class ConfigError(ValueError):
    """A configuration file or object is invalid; the text names the field and the bad value."""


class ReplayError(ProtocolError):
    """A well-formed message that is not acceptable now: past round, repeat, or wrong sender/topic."""


class DataError(SchemaError, ConfigError):
    """A user's data file cannot be used; the text names the file, the line (or byte offset) and the field.

    Both a schema error (the record is malformed) and a configuration error (the user pointed at
    the wrong file), so every command line that reports either ends in that one line.
    """

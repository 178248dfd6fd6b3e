"""The project's own error types.

Every failure that bad input can cause is one of these, so the command line can print one
line and exit non-zero instead of a traceback, and fuzzers can tell "refused" from "crashed".
"""


class LlraidError(Exception):
    """Base of every error llraid raises on purpose."""


class FormatError(LlraidError):
    """Bytes that do not parse as the structure they should hold."""


class NotMdMemberError(FormatError):
    """No md superblock where one should be."""


class ChecksumError(FormatError):
    """A superblock whose stored checksum differs from the computed one."""

    def __init__(self, message: str, expected: int, found: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class LayoutError(LlraidError):
    """A level/layout/chunk combination md would refuse."""


class AssemblyError(LlraidError):
    """Members that cannot be put together into one array."""


class DirtyDegradedError(AssemblyError):
    """raid4/5 not shut down cleanly and missing a member: md's "cannot start dirty degraded array"
    (parity of the stripes being written at the crash may be stale; ``--force`` starts it anyway)."""


class DeviceError(LlraidError):
    """A member device that cannot be opened, read or is too small."""


class BitmapIOError(LlraidError):
    """The bitmap could not be read from, or written to, any member."""


class IOFailure(LlraidError):
    """A read or write that no member could serve."""

"""The errors a user can act on: one line on stderr, exit 1, no traceback (stage.run prints them)."""

import errno
import re


class UserError(Exception):
    """A problem the user can fix (bad params, missing data): one line, no traceback.

    One line whatever it quotes: line breaks in it become spaces, and any other control character (an ESC
    from a key, a NUL from a file name) is shown escaped, never sent to the terminal.
    """

    restorable = True  # under DVC, the last good outputs are worth naming (restore_hint)

    def __init__(self, message):
        super().__init__(printable(" ".join(str(message).splitlines())))


class Damaged(UserError):
    """A file a stage reads is not the one its stage wrote: the line gives the repair, and checking out the
    reading stage's last outputs would not help (DVC's cache may hold the damaged copy)."""

    restorable = False


def printable(text):
    """text with every control character escaped (ESC -> \\x1b): what a message may send to a terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def shown(value, limit=80):
    """A value as a message quotes it: its repr, cut to `limit` characters (a value may be of any size)."""
    text = printable(repr(value))
    return text if len(text) <= limit else f"{text[:limit - 4]} ..."


FILE_SIZE_LIMIT = "over the file-size limit"
FULL = {errno.ENOSPC: "no space left on its disk", errno.EDQUOT: "over the disk quota", errno.EFBIG: FILE_SIZE_LIMIT}
# h5py and TensorFlow put the errno inside their message, not in OSError.errno
FULL_TEXT = {errno.ENOSPC: re.compile(r"No space left on device|errno = 28\b"),
             errno.EDQUOT: re.compile(r"Disk quota exceeded|errno = 122\b"),
             errno.EFBIG: re.compile(r"File too large|errno = 27\b")}


# NumPy's tofile reports a short write without an errno: the disk filled, or the file reached `ulimit -f`
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def out_of_space(err):
    """Why an OSError is a full disk, a quota or a file-size limit (ulimit -f), in words; None if it is not."""
    import resource

    if getattr(err, "errno", None) in FULL:
        return FULL[err.errno]
    if SHORT_WRITE.search(str(err)):
        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
        return FILE_SIZE_LIMIT if limited else FULL[errno.ENOSPC]
    return next((FULL[code] for code, text in FULL_TEXT.items() if text.search(str(err))), None)

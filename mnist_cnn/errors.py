"""The errors a user can act on: one line on stderr, exit 1, no traceback (stage.run prints them)."""


class UserError(Exception):
    """A problem the user can fix (bad params, missing data): one line, no traceback.

    One line whatever it quotes: line breaks in it become spaces.
    """

    restorable = True  # under DVC, the last good outputs are worth naming (restore_hint)

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class Damaged(UserError):
    """A file a stage reads is not the one its stage wrote: the line gives the repair, and checking out the
    reading stage's last outputs would not help (DVC's cache may hold the damaged copy)."""

    restorable = False

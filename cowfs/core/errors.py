"""User-facing errors: a message and an exit status, printed without a traceback.

Only the command line catches :class:`CowfsError`; inside the filesystem, failures travel as
``OSError`` with an errno and become ``FUSEError`` at the pyfuse3 boundary
(:mod:`cowfs.daemon.operations`).
"""


class CowfsError(Exception):
    """A problem the user can fix (bad arguments, unusable layers); not a bug in cowfs."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

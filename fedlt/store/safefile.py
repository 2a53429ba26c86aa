"""Writing into a run folder without following symbolic links.

A run folder is input: someone else may have made it (a shared disk, a downloaded archive of
runs). A ``summary.json`` that is a link to ``~/.bashrc`` would have fedlt overwrite the user's
file on resume. So every file fedlt writes, appends to or replaces in a run folder goes through
this module: appends and the lock open with ``O_NOFOLLOW`` (no race between a check and the
open), and replacements and folders handed to other libraries (TensorBoard, W&B) are checked
with :func:`refuse_link` first. :func:`check_no_links` looks at the whole folder before a run
claims it, so such a folder is refused before any data is built or any round trained.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fedlt.errors import FedltError

__all__ = ["LinkError", "check_no_links", "open_nofollow", "refuse_link"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LinkError(FedltError):
    """A file fedlt would write in a run folder is a symbolic link: writing would follow it.

    Exit status 2: found before the run starts (:func:`check_no_links`); the writers check again.
    """

    exit_status = 2

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            target = f" (to {os.readlink(self.path)})"
        except OSError:
            target = ""
        super().__init__(
            f"{self.path} is a symbolic link{target}. fedlt never writes through a link in a run folder: "
            f"it would overwrite a file that is not the run's. Remove the link (the file it points to "
            f"is untouched) or use another folder."
        )


def refuse_link(path: Path) -> Path:
    """``path`` itself, after checking it is not a symbolic link (raises :class:`LinkError`)."""
    path = Path(path)
    if path.is_symlink():
        raise LinkError(path)
    return path


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW, mode)``: a link at ``path`` raises :class:`LinkError`.

    Where the OS lacks ``O_NOFOLLOW`` the link is looked for first instead.
    """
    path = Path(path)
    if not _NOFOLLOW:
        refuse_link(path)
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        # ELOOP on Linux and macOS; EMLINK on FreeBSD; O_CREAT|O_EXCL on a link gives EEXIST.
        if exc.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():
            raise LinkError(path) from None
        raise


def check_no_links(run_dir: Path, names: list[str]) -> None:
    """Refuse a run folder in which any of ``names`` (fedlt's artefacts) is a symbolic link."""
    for name in names:
        refuse_link(Path(run_dir) / name)

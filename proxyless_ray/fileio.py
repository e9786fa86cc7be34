"""Files written the same way everywhere: through a temp file and a rename (never half-written), with the
permissions the user's umask gives (not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import os
import tempfile


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename: never half-written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder!r} is not writable")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask_mode(folder: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` give a new file / folder under this process's umask.

    ``mkstemp`` and ``mkdtemp`` create 0600 / 0700 whatever the umask; outputs written through them and renamed
    into place get this mode instead, like any other file the user creates.
    """
    mask = None
    try:
        with open("/proc/self/status") as fh:  # reads the umask without changing it (other threads may be writing)
            mask = next((int(line.split()[1], 8) for line in fh if line.startswith("Umask:")), None)
    except OSError:
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask

"""How a folder of files changes all or nothing: atomic files, one commit point, a folder lock.

A rename replaces one file atomically, never several. So a save writes its data files under
names of their own first (an artifact's tensor file is named by its content), then replaces the
one file that names them: that rename is the commit. Until it, the folder still holds the
previous version, whose commit file names its own data files; after it, the new one. The files
that follow (a model card) and the removal of what no commit file names any more (an earlier
tensor file, the leftovers of a killed save) come after the commit.

Savers of one folder hold an exclusive lock on it (``fcntl.flock`` on the folder itself: no lock
file is left in it) for the whole save, so concurrent saves run one after the other and the last
one wins; the kernel drops the lock when its process dies, so a killed save never blocks the
next. Readers take no lock: they
read the commit file, then what it names, and read again if a save replaced it meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: each file is still replaced atomically, saves are not serialised
    fcntl = None

#: what `atomic_write` names its temporary files: ``.<name>.<pid>.<16 hex>.tmp``
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.\d+\.[0-9a-f]{16}\.tmp")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The temporary file is created with mode 0666 and the process umask applies, as for any
    file the user writes (``tempfile.mkstemp`` would make it 0600, and reading the umask to
    undo that means setting it: a process-wide side effect).

    Args:
        path: the file to create or replace (its folder is created if needed).
        data: its new contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s save lock (exclusive, blocking) for the duration of the block.

    Args:
        folder: the folder (created if needed).

    Returns:
        A context manager.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def commit_files(
    folder: Path,
    data: dict[str, bytes],
    commit: tuple[str, bytes],
    after: dict[str, bytes],
    owned: Callable[[str], bool],
) -> None:
    """Replace a folder's files as one change, under the folder's lock.

    Args:
        folder: where (created if needed).
        data: files the commit file names, written first; each name must be new to the
            version being replaced (content-named), so that the previous version stays whole.
        commit: ``(name, bytes)`` of the file whose replacement switches versions.
        after: files written once the commit is done (derived, not needed to read the rest).
        owned: whether a file name belongs to what is saved here: such files that this save
            did not write (an earlier version's data file), and temporary files of such names
            left by a killed save, are removed after the commit.
    """
    folder = Path(folder)
    with folder_lock(folder):
        for name, contents in data.items():
            atomic_write(folder / name, contents)
        atomic_write(folder / commit[0], commit[1])
        for name, contents in after.items():
            atomic_write(folder / name, contents)
        written = {*data, commit[0], *after}
        for path in folder.iterdir():
            temporary = _TEMPORARY.fullmatch(path.name)
            name = temporary["name"] if temporary else path.name
            if owned(name) and (temporary or name not in written):
                path.unlink(missing_ok=True)

"""Atomic file writing: a kill at any moment leaves the old file or the new one, never half.

Also the early check that a path can be written, so a long job fails before its work, not after.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Optional, Union


def _file_mode(path: str) -> int:
    """The mode `open(path, "w")` would give: the old file's if it exists, else 0666 minus the umask
    (what `paddle.save` produces), never the 0600 of a bare temp file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cannot_write(path: str, e: OSError) -> OSError:
    """The error of a failed write, naming the user's file (not a temp file) and the fix."""
    return type(e)(e.errno, f"cannot write {path!r} ({e.strerror}): pass a path in a writable "
                            f"directory")


@contextlib.contextmanager
def atomic_path(path: Union[str, "os.PathLike[str]"]) -> Iterator[str]:
    """A temp path beside `path` to write to; on success it replaces `path` in one rename.

    The temp file is flushed to disk (fsync) before the rename and the directory after it, so a
    kill at any moment leaves either the old file or the new one, never half of one. The file
    gets the mode `open(path, "w")` would give (see `_file_mode`). On error the temp file is
    removed and `path` is untouched.

    Args:
        path: the file to (re)write; its directory is created if missing.

    Yields:
        The temp path: write the whole file there, then leave the block.

    Raises:
        OSError: the directory cannot be created or written (the message names `path`).

    Examples:
        >>> with atomic_path("ckpt/final.pdparams") as tmp:
        ...     paddle.save(state, tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:
        raise _cannot_write(path, e) from e
    os.close(fd)
    try:
        yield tmp
        replace_with(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_with(tmp: str, path: str) -> None:
    """Put the finished file `tmp` (in `path`'s directory) in place of `path`, durably: flushed
    to disk, given the mode `open(path, "w")` would give, renamed, the directory flushed."""
    with open(tmp, "rb+") as f:  # whatever wrote it (paddle.save too), it is on disk now
        os.fsync(f.fileno())
    os.chmod(tmp, _file_mode(path))
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def directory_problem(directory: Union[str, "os.PathLike[str]"], create: bool = True) -> Optional[OSError]:
    """The error writing a file in `directory` raises (made first if `create`), or None if it can.

    Writes and removes a probe file: the one check behind every "can we write there" question.
    """
    try:
        if create:
            os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e
    return None


def check_writable(path: Union[str, "os.PathLike[str]"], what: str = "file") -> str:
    """Fail now, not after hours of work, if `path` cannot be written later.

    Creates the directory if missing and writes (then removes) a probe file in it.

    Args:
        path: the file that will be written.
        what: how the message names it ("sensitivity file", ...).

    Returns:
        `path` as a str.

    Raises:
        ValueError: `path` is a directory, or its directory cannot be created or written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory: pass a file path such as "
                         f"{os.path.join(path, 'sensitivity.json')!r}")
    directory = os.path.dirname(os.path.abspath(path))
    problem = directory_problem(directory)
    if problem is not None:
        raise ValueError(f"cannot write {what} {path!r}: {problem.strerror} in {directory!r}; pass a "
                         f"path in a writable directory") from problem
    return path


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to `path` atomically (see `atomic_path`): a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

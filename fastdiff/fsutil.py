"""File utilities that lose nothing and touch nothing else: atomic writes, fastdiff's own temp files, run locks.

- `atomic_write(path, write)`: the bytes go to a temporary file created exclusively (O_CREAT | O_EXCL |
  O_NOFOLLOW, via tempfile.mkstemp) with an unpredictable name in `path`'s directory, are fsynced, and then
  `os.replace` it onto `path` (a symlink at `path` is replaced, never written through). The temp file's name carries
  its owner (a host tag and the pid): `.NAME.fdtmp-HOST-PID-RANDOM`.
- `clean_temps(dir)`: removes only such fastdiff temp files of this host whose process is gone, that are regular
  files owned by this user; every other file (other dotfiles, a live process's temp file, a planted symlink) stays.
- `DirLock(dir)`: an exclusive fcntl.flock on DIR/.fastdiff.lock, held for a run (released when the process dies).
- `check_output_file` / `check_output_dir`: up-front checks, before any work starts, that an output can be written
  (its directory exists and is writable, the path is not a directory / not a file), naming the argument.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import tempfile
from typing import Any, Callable, Sequence

TEMP_TAG = ".fdtmp-"
LOCK_NAME = ".fastdiff.lock"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.fdtmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def host_tag() -> str:
    """8 hex digits naming this host (a pid means something only on the host that made it)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}{TEMP_TAG}{host_tag()}-{os.getpid()}-"


def is_fastdiff_temp(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we could have written: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _replaceable(path: str) -> None:
    """`path` may be replaced by a regular file: absent, a regular file, or a symlink (the link itself is replaced);
    never a directory, a device, a FIFO or a socket (replacing /dev/null would be a disaster as root)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory, not a file name")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(errno.EINVAL, f"{path!r} exists and is not a regular file (a device, FIFO or socket); "
                                    "refusing to replace it")


def _mkstemp(path: str, d: str) -> tuple[int, str]:
    """tempfile.mkstemp (O_CREAT | O_EXCL | O_NOFOLLOW, mode 0o600, a random name) in `d`, with an error that names
    the file being written and its directory rather than the temp name."""
    try:
        return tempfile.mkstemp(prefix=temp_prefix(path), dir=d)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write {path!r}: {_why_not_creatable(d, e)}") from None


def _why_not_creatable(d: str, e: OSError) -> str:
    """Why no file can be created in directory `d`, from the error creating one raised: the real cause, named."""
    if not os.path.lexists(d):
        return f"directory {d!r} does not exist"
    if not os.path.isdir(d):
        return f"{d!r} is not a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"directory {d!r} is not writable ({e.strerror})"
    if e.errno == errno.EROFS:
        return f"directory {d!r} is on a read-only file system"
    if e.errno == errno.ENOENT:  # the directory is there but takes no new files: /proc, /sys, a FUSE mount, ...
        return f"directory {d!r} does not accept new files (creating one failed: {e.strerror}; a virtual file system?)"
    return f"cannot create a file in directory {d!r}: {e.strerror}"


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write `path` all or nothing: `write(f)` fills an exclusive temp file in the same directory (see the module
    docstring), which is fsynced and renamed onto `path`. On any error the temp file is removed and `path` is as it
    was. The file gets the usual 0o666 & ~umask permissions."""
    d = os.path.dirname(os.path.abspath(path))
    _replaceable(path)
    fd, tmp = _mkstemp(path, d)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(d)


def exclusive_create(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if nothing is there (atomically: a complete temp file hard-linked into place,
    which fails if `path` exists, even as a dangling symlink). Returns False if `path` already existed."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = _mkstemp(path, d)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            return False
    finally:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(d)
    return True


def clean_temps(directory: str, targets: Sequence[str] | None = None) -> list[str]:
    """Remove fastdiff's temp files in `directory` left by dead processes of this host (only those of the files
    named `targets`, if given); returns the names removed."""
    me, uid = host_tag(), os.getuid() if hasattr(os, "getuid") else None
    removed = []
    for name in os.listdir(directory):
        m = _TEMP_RE.match(name)
        if m is None or m["host"] != me or _pid_alive(int(m["pid"])):
            continue
        if targets is not None and m["target"] not in targets:
            continue
        p = os.path.join(directory, name)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        try:
            os.remove(p)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class LockBusy(RuntimeError):
    """Another process holds the lock."""


class DirLock:
    """An exclusive flock on DIR/.fastdiff.lock (or DIR/`name`; the file holds the holder's pid). Not re-entrant; released by
    `release()` or when the process ends, however it ends."""

    def __init__(self, directory: str, name: str = LOCK_NAME):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            with open(self.path, "rb") as f:
                return f.read(64).decode(errors="replace").strip() or "?"
        except OSError:
            return "?"

    def acquire(self, blocking: bool = False) -> bool:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise OSError(e.errno, f"{self.path} is a symlink; refusing to follow it "
                                           "(delete it if you did not put it there)") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # the file we locked must still be the one at the path (not replaced meanwhile)
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.fd = fd
            return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race a waiter)
            self.fd = None

    def __enter__(self):
        if not self.acquire():
            raise LockBusy(f"{self.directory} is locked by another process ({self.holder()})")
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------------------------
# up-front checks

def _writable_dir(d: str, what: str) -> None:
    if not os.path.exists(d):
        raise FileNotFoundError(errno.ENOENT, f"{what}: directory {d!r} does not exist")
    if not os.path.isdir(d):
        raise NotADirectoryError(errno.ENOTDIR, f"{what}: {d!r} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{what}: directory {d!r} is not writable")
    # os.access trusts the permission bits (and root passes them all): create and remove a probe file, so that a
    # read-only mount or a virtual file system (/proc) is reported now, with its real cause, not after the work
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(os.path.join(d, "probe")), dir=d)
    except OSError as e:
        raise type(e)(e.errno, f"{what}: {_why_not_creatable(d, e)}") from None
    os.close(fd)
    os.remove(probe)


def check_output_file(path: str, what: str) -> str:
    """Before any work: `path` can be written (atomically) — its directory exists and is writable, and `path` is not
    a directory. Returns the absolute path. Raises an OSError subclass whose message starts with `what`."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{what}: expected a file name, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise IsADirectoryError(errno.EISDIR, f"{what}: {path!r} is a directory, not a file name")
    a = os.path.dirname(p)
    while not os.path.lexists(a):
        a = os.path.dirname(a)
    if not os.path.isdir(a):  # x.npz/a.png: lstat would say only "Not a directory"
        raise NotADirectoryError(errno.ENOTDIR, f"{what}: cannot write {path!r}: {a!r} is a file, not a directory")
    try:
        _replaceable(p)
    except OSError as e:
        raise type(e)(e.errno, f"{what}: {e.strerror or e}") from None
    _writable_dir(os.path.dirname(p), what)
    return p


def check_output_dir(path: str, what: str) -> str:
    """Before any work: `path` is a writable directory, or can be made one (its nearest existing ancestor is a
    writable directory). Returns the absolute path."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{what}: expected a directory name, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise NotADirectoryError(errno.ENOTDIR, f"{what}: {path!r} exists and is not a directory")
        _writable_dir(p, what)
        return p
    if os.path.islink(p):
        raise FileNotFoundError(errno.ENOENT, f"{what}: {path!r} is a dangling symlink")
    a = os.path.dirname(p)
    while not os.path.exists(a):
        a = os.path.dirname(a)
    if not os.path.isdir(a):
        raise NotADirectoryError(errno.ENOTDIR, f"{what}: {a!r} (in {path!r}) is not a directory")
    _writable_dir(a, what)
    return p

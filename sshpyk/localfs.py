"""Local files that hold secrets or sockets, and names that come from remote data.

Everything sshpyk writes locally that another local user must not read or swap goes
through here: private directories (0700, ours, not a symlink), private files (0600,
created with ``O_EXCL | O_NOFOLLOW``, so neither a planted file nor a symlink is
followed), and kernel ids received from the remote host before they become part of
a local file name. The connection broker's directory, the unix sockets in it and the
uid of a socket's peer are checked here too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import UnsafePathError

__all__ = [
    "BROKER_DIR_ENV",
    "broker_dir",
    "check_kernel_id",
    "check_own_socket",
    "check_private_dir",
    "make_private_dir",
    "open_private_file",
    "peer_credentials",
    "read_private_json",
    "socket_base_dir",
    "write_private_json",
]

#: Overrides where the connection broker's private directory is (tests use it).
BROKER_DIR_ENV = "SSHPYK_BROKER_DIR"

#: kernel ids sshpyk makes are UUIDs; anything of letters, digits and '-' is accepted
_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
#: sun_path holds 108 bytes on Linux, 104 on macOS, NUL included; room for "/k-N"
_MAX_SOCKET_DIR = 96


def check_kernel_id(kernel_id: object) -> str:
    """``kernel_id`` if it is safe as part of a file name ([A-Za-z0-9-], at most 128
    characters), else :class:`UnsafePathError`. Ids from the remote host pass here
    before any local name is made of them."""
    text = str(kernel_id)
    if not isinstance(kernel_id, str) or not _KERNEL_ID.fullmatch(text):
        raise UnsafePathError(
            f"refusing kernel id {text[:80]!r}: only letters, digits and '-' are allowed"
        )
    return text


def check_private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a real directory (not a symlink), owned by us, mode 0700."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafePathError(f"cannot use {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory (a symlink or a file is refused)")
    if st.st_uid != os.getuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to you")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafePathError(
            f"{path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
            "chmod 700 it"
        )
    return path


def make_private_dir(
    path: str | os.PathLike[str] | None = None,
    *,
    parent: str | None = None,
    prefix: str = "sshpyk-",
) -> Path:
    """A 0700 directory of ours: ``path`` (created if missing, else checked), or a
    fresh one under ``parent`` (``mkdtemp``: an unpredictable name, created atomically)."""
    if path is None:
        return check_private_dir(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePathError(f"cannot create {path}: {exc.strerror}") from exc
    return check_private_dir(path)


def socket_base_dir() -> str:
    """Where private socket directories go: ``XDG_RUNTIME_DIR`` when it is ours and
    short enough for a unix socket path, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and len(xdg) <= _MAX_SOCKET_DIR - 16:
        try:
            check_private_dir(xdg)
            return xdg
        except UnsafePathError:
            pass
    base = tempfile.gettempdir()
    return base if len(base) <= _MAX_SOCKET_DIR - 16 else "/tmp"


def write_private_json(path: str | os.PathLike[str], data: Any, *, replace: bool = False) -> Path:
    """Write ``data`` as JSON to a new 0600 file at ``path``.

    The file is created with ``O_EXCL | O_NOFOLLOW``: an existing file or symlink at
    ``path`` is never written through. With ``replace`` the file is written next to
    ``path`` under a fresh name and renamed over it (a symlink at ``path`` is then
    replaced, not followed). A missing parent is created 0700.
    """
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    target = path
    if replace:
        target = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as exc:
        raise UnsafePathError(
            f"{path} already exists: refusing to write a key into a file that is not new"
        ) from exc
    except OSError as exc:
        raise UnsafePathError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        if replace:
            os.replace(target, path)
    except BaseException:
        if replace:
            target.unlink(missing_ok=True)
        raise
    return path


def read_private_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, a regular file of ours that nobody else may write (opened
    with ``O_NOFOLLOW``: a symlink is refused), else :class:`UnsafePathError`."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise UnsafePathError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, encoding="utf-8") as f:
        _check_own_file(path, os.fstat(fd))
        try:
            return json.load(f)
        except ValueError as exc:
            raise UnsafePathError(f"{path} is not valid JSON: {exc}") from exc


def open_private_file(path: str | os.PathLike[str], flags: int = os.O_RDWR) -> int:
    """A file descriptor on ``path``, created 0600 if missing; an existing entry must be
    a regular file of ours that nobody else may write (a symlink is not followed)."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise UnsafePathError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        _check_own_file(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_own_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file")
    if st.st_uid != os.getuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to you")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UnsafePathError(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it"
        )


def check_own_socket(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a unix socket of ours (not a symlink), else
    :class:`UnsafePathError`; FileNotFoundError if there is nothing there."""
    path = Path(path)
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePathError(f"{path} is not a unix socket (a symlink or a file is refused)")
    if st.st_uid != os.getuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to you")
    return path


def peer_credentials(sock: socket.socket) -> tuple[int | None, int] | None:
    """``(pid or None, uid)`` of the process at the other end of a connected unix
    socket, as the kernel saw it (SO_PEERCRED on Linux; LOCAL_PEERCRED and LOCAL_PEERPID
    on macOS); None where that is not available. (A copy of the remote agent's
    ``paths.peer_credentials``: the agent's modules are not imported here.)"""
    try:
        if hasattr(socket, "SO_PEERCRED"):
            size = struct.calcsize("3i")
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
            )
            return pid, uid
        if sys.platform == "darwin":
            # struct xucred {u_int cr_version; uid_t cr_uid; ...} (SOL_LOCAL 0, LOCAL_PEERCRED 1)
            data = sock.getsockopt(0, 0x001, 76)
            uid = struct.unpack_from("=Ii", data)[1]
            try:
                peer_pid: int | None = struct.unpack("=i", sock.getsockopt(0, 0x002, 4))[0]
            except OSError:
                peer_pid = None
            return peer_pid, uid
    except (OSError, struct.error):
        pass
    return None


def broker_dir(version: int) -> Path:
    """The connection broker's private directory (0700, ours; made if missing):
    ``$SSHPYK_BROKER_DIR``, else ``sshpyk-broker-<uid>-v<version>`` under
    :func:`socket_base_dir`. A planted or loosened directory is refused
    (:class:`UnsafePathError`)."""
    override = os.environ.get(BROKER_DIR_ENV)
    if override:
        path = Path(os.path.abspath(os.path.expanduser(override)))
    else:
        path = Path(socket_base_dir()) / f"sshpyk-broker-{os.getuid()}-v{version}"
    if len(str(path)) > _MAX_SOCKET_DIR:
        raise UnsafePathError(
            f"{path} is too long for a unix socket path (at most {_MAX_SOCKET_DIR} characters)"
        )
    return make_private_dir(path)

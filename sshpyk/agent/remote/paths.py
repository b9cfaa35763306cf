"""Trusted files and directories on shared hosts.

Run dirs and agent dirs live in shared places (/tmp). Nothing read from there is
trusted unless it passes these checks; an entry that fails them is ignored, never
acted on. See ``private_dir_problem``, ``read_trusted`` and ``run_root_problem``.
"""

import json
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile

from .protocol import AgentError, Kind

#: bound on a record read from a run dir or agent dir (sshpyk.json, agent.json)
MAX_RECORD_BYTES = 1 << 20
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def as_int(value, default=0):
    """An int from a record field, ``default`` for anything else (a record may be junk)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def user_name(uid):
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, OverflowError):
        return None


def private_dir_problem(st, owner):
    """None if ``st`` (an lstat or fstat result) is a private directory: a directory,
    not a symlink, mode exactly 0700, owned by ``owner`` (any uid if ``owner`` is None);
    else what is wrong with it."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if owner is not None and st.st_uid != owner:
        return "belongs to uid %d, not %d" % (st.st_uid, owner)
    if stat.S_IMODE(st.st_mode) != 0o700:
        return "has mode %03o, not 700" % stat.S_IMODE(st.st_mode)
    return None


def read_trusted(dir_path, name, owner):
    """``(data, uid)``: the content of file ``name`` in ``dir_path`` and the uid owning
    both, or None unless ``dir_path`` is a private dir of ``owner`` (see
    ``private_dir_problem``; None: of any uid) and ``name`` a regular file of the same
    owner, at most MAX_RECORD_BYTES long.

    The dir is opened once (O_NOFOLLOW, then fstat, same inode as the lstat) and the
    file relative to it (O_NOFOLLOW: no symlink; O_NONBLOCK: a FIFO cannot hang us), so
    a path swapped between check and use is never read."""
    try:
        st = os.lstat(dir_path)
    except OSError:
        return None
    if private_dir_problem(st, owner):
        return None
    try:
        dfd = os.open(dir_path, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    except OSError:
        return None
    try:
        dst = os.fstat(dfd)
        if (dst.st_dev, dst.st_ino) != (st.st_dev, st.st_ino) or private_dir_problem(dst, owner):
            return None
        fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, dir_fd=dfd)
    except (OSError, NotImplementedError):
        os.close(dfd)
        return None
    try:
        fst = os.fstat(fd)
        if (
            not stat.S_ISREG(fst.st_mode)
            or fst.st_uid != dst.st_uid
            or fst.st_size > MAX_RECORD_BYTES
        ):
            return None
        chunks, size = [], 0
        while size <= MAX_RECORD_BYTES:
            chunk = os.read(fd, MAX_RECORD_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_RECORD_BYTES:
            return None
        return b"".join(chunks), dst.st_uid
    except OSError:
        return None
    finally:
        os.close(fd)
        os.close(dfd)


def trusted_json(dir_path, name, owner):
    """``(dict, uid)`` of the JSON record ``name`` in a trusted dir, see read_trusted."""
    found = read_trusted(dir_path, name, owner)
    if found is None:
        return None
    try:
        value = json.loads(found[0].decode("utf-8"))
    except ValueError:
        return None
    return (value, found[1]) if isinstance(value, dict) else None


def run_root_problem(path, uid=None):
    """``(real path, None)`` if ``path`` is safe to hold run dirs, else ``(path, why)``
    with a one-line reason and what to do.

    Safe: owned by the user (or root) and not writable by group or others, or owned by
    root with the sticky bit set (like /tmp: nobody may rename or remove another user's
    entries). A symlink, anywhere in the path, is resolved once: the real path must pass
    the same check and is the one used from then on, so a link changed later does not
    matter. Every ancestor of the real path must be the user's or root's and not
    writable by others unless sticky, else the root itself could be swapped."""
    uid = os.getuid() if uid is None else uid
    real = os.path.realpath(path)
    try:
        st = os.lstat(real)
    except OSError as exc:
        return path, "run root %s cannot be used: %s" % (path, exc.strerror or exc)
    shown = path if real == path else "%s (%s)" % (path, real)
    if not stat.S_ISDIR(st.st_mode):
        return path, "run root %s is not a directory" % shown
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0 and mode & stat.S_ISVTX:
        pass
    elif st.st_uid not in (uid, 0):
        return path, (
            "run root %s belongs to uid %d: use a directory of your own (mkdir -m 700 DIR)"
            % (shown, st.st_uid)
        )
    elif mode & 0o022:
        return path, (
            "run root %s is group- or world-writable: use a directory only you can write "
            "(chmod 700 %s)" % (shown, real)
        )
    parent = os.path.dirname(real)
    for _ in range(real.count(os.sep) + 1):
        try:
            pst = os.lstat(parent)
        except OSError as exc:
            return path, "run root %s: cannot check %s: %s" % (shown, parent, exc.strerror)
        pmode = stat.S_IMODE(pst.st_mode)
        if pst.st_uid not in (uid, 0) or (pmode & 0o022 and not pmode & stat.S_ISVTX):
            return path, (
                "run root %s is inside %s, which another user can change: use a directory "
                "only you and root can write" % (shown, parent)
            )
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    return real, None


def checked_run_root(path, create=False):
    """The real path of a run root that passes run_root_problem (with ``create``, a
    missing one is made 0700 first); else AgentError ``unsafe_path``."""
    path = os.path.abspath(os.path.expanduser(path))
    if create and not os.path.lexists(path):
        missing = []
        head = path
        while head and not os.path.lexists(head) and len(missing) < 64:
            missing.append(head)
            head = os.path.dirname(head)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise AgentError(
                    Kind.UNSAFE_PATH, "cannot create run root %s: %s" % (path, exc.strerror)
                ) from None
    real, problem = run_root_problem(path)
    if problem:
        raise AgentError(Kind.UNSAFE_PATH, problem)
    return real


def default_run_roots(extra=None):
    """Where run dirs and agent dirs are looked for: ``extra`` (a request's or the
    hello's run root: AgentError ``unsafe_path`` if it exists and is not safe, skipped
    if it does not exist), then XDG_RUNTIME_DIR and the temp dir if they are safe."""
    roots = []
    if extra and os.path.lexists(os.path.abspath(os.path.expanduser(extra))):
        roots.append(checked_run_root(extra))
    for root in [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()]:
        if root and os.path.isdir(root):
            real, problem = run_root_problem(root)
            if problem is None and real not in roots:
                roots.append(real)
    return roots


def private_run_dir(run_root, kernel_id):
    """A new 0700 dir ``sshpyk-<kid8>-XXXX`` (tempfile.mkdtemp) in ``run_root`` (checked,
    made if missing: AgentError ``unsafe_path`` if unsafe) or else in the first safe,
    writable default root."""
    if run_root:
        roots = [checked_run_root(run_root, create=True)]
    else:
        roots = [r for r in default_run_roots() if os.access(r, os.W_OK)]
    last = "no safe run root (XDG_RUNTIME_DIR, %s)" % tempfile.gettempdir()
    for root in roots:
        try:
            path = tempfile.mkdtemp(prefix="sshpyk-%s-" % (kernel_id or "k")[:8], dir=root)
            os.chmod(path, 0o700)
            problem = private_dir_problem(os.lstat(path), os.getuid())
            if problem is None:
                return path
            last = "%s %s" % (path, problem)
        except OSError as exc:
            last = exc
    raise AgentError(Kind.LAUNCH_FAILED, "cannot create a private run directory: %s" % last)


def mtime(path):
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def remove_tree(path, owner=None):
    """Remove a run dir or agent dir of ``owner`` (default: this user) with
    shutil.rmtree (which never follows symlinks). None once it is gone, else why it is
    not (one line). A dir that fails private_dir_problem is left alone."""
    owner = os.getuid() if owner is None else owner
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "cannot check %s: %s" % (path, exc.strerror)
    problem = private_dir_problem(st, owner)
    if problem:
        return "not removing %s: it %s" % (path, problem)
    errors = []

    def failed(_func, where, exc):
        errors.append("%s: %s" % (where, getattr(exc, "strerror", None) or exc))

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=lambda f, where, info: failed(f, where, info[1]))
    if os.path.lexists(path):
        return "cannot remove %s: %s" % (path, errors[0] if errors else "it is still there")
    return None


def write_json_atomic(directory, name, record):
    """Write ``record`` as the JSON file ``name`` in ``directory`` through a temporary
    file and a rename, so a reader (``ps``) sees the old record or the new one."""
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def peer_credentials(sock):
    """``(pid or None, uid)`` of the process at the other end of a connected unix
    socket, as the kernel saw it (SO_PEERCRED on Linux; LOCAL_PEERCRED and LOCAL_PEERPID
    on macOS); None where that is not available."""
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
                pid = struct.unpack("=i", sock.getsockopt(0, 0x002, 4))[0]  # LOCAL_PEERPID
            except OSError:
                pid = None
            return pid, uid
    except (OSError, struct.error):
        pass
    return None

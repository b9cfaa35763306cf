"""Installs the agent's modules from their sources, on the remote host.

``protocol.LOADER`` (the remote command line) reads a header (a length line, then
JSON), runs this module's source from it and calls :func:`boot`. A full bundle
(``{module: source}``, in dependency order: a module imports only those before it; an
execution host gets one, see batch.py) is installed by :func:`install` as the package
``protocol.PACKAGE`` in ``sys.modules``; a ``load`` request adds more modules (a batch
launcher's) the same way. The package keeps every source it was given (``SOURCES``),
so the agent can send itself on.

The agent's own start sends a short header instead, which names the bundle by its hash
(``HASH_KEY``): :func:`boot` looks for its compiled code in the user's cache on this
host (:func:`cache_dir`: a private dir; each entry is named for the bundle's hash and
this Python's bytecode, so another Python gets its own entry). Trust in an entry rests
on the dir being this user's with mode 0700, and the entry a private file of ours
(both checked on the opened fd, no link followed): nobody else can have written it.
The sha256 an entry carries is a checksum against corruption (a torn or damaged
file), not a signature. Found: no upload, no compile. Not
found: it asks for the bundle (the event ``NEED_CODE``), keeps the request lines that
were sent without waiting for it (the hello, a first launch), compiles the bundle,
stores it for the next agent (atomically, 0600) and hands the kept lines on as the
start of stdin.

Stdlib only and no imports of the package: it runs before the package exists.
"""

import hashlib
import io
import json
import marshal
import os
import stat
import sys
import time
import types

PACKAGE = "sshpyk_agent"  # protocol.PACKAGE; this module cannot import it
NEED_CODE = "need_code"  # protocol.Event.NEED_CODE
#: header keys (no module is named so): the bundle's hash, the protocol version
HASH_KEY = "#hash"
VERSION_KEY = "#v"
#: the first bytes of a cache entry; then the sha256 of the rest, in hex, and a newline
MAGIC = b"sshpyk-agent-code 1 "
#: entries kept per cache dir (one per sshpyk version and remote Python); older ones go
MAX_ENTRIES = 16
#: bound on an entry read, and on the lines read ahead of the bundle
MAX_ENTRY_BYTES = 64 << 20
MAX_AHEAD_LINES = 1000
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def install(sources, name=PACKAGE, code=None):
    """Create (or extend) the package ``name`` with the modules in ``sources``
    (``{module: source}``, in dependency order); modules it has already are skipped.
    ``code``: ``{module: code object}`` already compiled from those sources (a cache
    entry). Returns the package."""
    package = sys.modules.get(name)
    if package is None:
        package = types.ModuleType(name)
        package.__path__ = []
        package.__package__ = name
        sys.modules[name] = package
    if not hasattr(package, "SOURCES"):
        package.SOURCES = {}
    for module_name, source in sources.items():
        full = name + "." + module_name
        if full not in sys.modules:
            module = types.ModuleType(full)
            module.__package__ = name
            module.__file__ = _filename(name, module_name)
            sys.modules[full] = module
            try:
                compiled = (code or {}).get(module_name)
                if compiled is None:
                    compiled = compile(source, module.__file__, "exec")
                exec(compiled, module.__dict__)
            except BaseException:
                del sys.modules[full]
                raise
            setattr(package, module_name, module)
        package.SOURCES.setdefault(module_name, source)
    return package


def _filename(name, module_name):
    return "<%s/%s.py>" % (name, module_name)


def own_sources(name):
    """Every source the package ``name`` was installed from (``{module: source}``), or
    None if it was imported from files (the local tests)."""
    package = sys.modules.get(name)
    sources = getattr(package, "SOURCES", None)
    return dict(sources) if sources else None


def encode_bundle(sources):
    """What ``protocol.LOADER`` reads from stdin: a length line, then the JSON."""
    data = json.dumps(sources).encode("utf-8")
    return b"%d\n" % len(data) + data


def bundle_hash(bundle):
    """The name of a bundle (:func:`encode_bundle`'s bytes) in the cache."""
    return hashlib.sha256(bundle).hexdigest()


# -- the cache -----------------------------------------------------------------------


def cache_dir():
    """Where this user's agent code is cached: ``$XDG_CACHE_HOME/sshpyk/agent``, else
    ``~/.cache/sshpyk/agent``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sshpyk", "agent")


def entry_name(digest):
    """The entry of bundle ``digest`` for this Python: its bytecode is this Python's."""
    return "%s.%s-%x" % (digest, sys.implementation.cache_tag or "none", sys.hexversion)


def open_cache(create):
    """``(fd, None)``: the cache dir, opened without following links, checked to be a
    directory of this uid with mode 0700 (another user could change what is in any
    other); ``(None, why)`` if there is none fit for use. ``create``: make it first."""
    path = cache_dir()
    made = False
    if create:
        try:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            os.mkdir(path, 0o700)
            made = True
        except FileExistsError:
            pass
        except OSError as exc:
            return None, "cannot create %s: %s" % (path, exc.strerror or exc)
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        return None, "%s: %s" % (path, exc.strerror or exc)
    st = os.fstat(fd)
    if made and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        try:  # ours, just made: whatever the umask took away (on the fd: no link followed)
            os.fchmod(fd, 0o700)
            st = os.fstat(fd)
        except OSError:
            pass  # the mode check below says why it is not used
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.getuid():
        problem = "belongs to uid %d, not %d" % (st.st_uid, os.getuid())
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = "has mode %03o, not 700" % stat.S_IMODE(st.st_mode)
    if problem:
        os.close(fd)
        return None, "the cache %s %s: not used" % (path, problem)
    return fd, None


def read_entry(dir_fd, digest):
    """``(bundle, {module: code})`` of bundle ``digest`` from the cache, or ``(None,
    why)``: an entry is used only if it is a regular file of ours that nobody else may
    write (what makes it trusted, with open_cache's checks of the dir), whose content
    matches the checksum it carries (not corrupt) and whose bundle has ``digest``."""
    try:
        fd = os.open(entry_name(digest), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, "not cached yet"
    except OSError as exc:
        return None, "cache entry: %s" % (exc.strerror or exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None, "cache entry not a private file of ours"
        if st.st_size > MAX_ENTRY_BYTES:
            return None, "cache entry too large"
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        return None, "cache entry: %s" % (exc.strerror or exc)
    finally:
        os.close(fd)
    head, _, payload = data.partition(b"\n")
    if head != MAGIC + hashlib.sha256(payload).hexdigest().encode():
        return None, "cache entry corrupt (its hash does not match)"
    try:
        bundle, code = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None, "cache entry unreadable"
    if not isinstance(bundle, bytes) or bundle_hash(bundle) != digest:
        return None, "cache entry of another bundle"
    return (bundle, dict(code)), None


def write_entry(dir_fd, digest, bundle, code):
    """Store the compiled ``code`` of ``bundle`` (atomically: a private temporary file
    renamed over the entry), then drop the oldest entries beyond ``MAX_ENTRIES``.
    Best effort: a failure only means the next agent compiles again."""
    payload = marshal.dumps((bundle, sorted(code.items())))
    data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    name = entry_name(digest)
    temporary = ".%s.%d.tmp" % (name, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        try:
            os.unlink(temporary, dir_fd=dir_fd)
        except OSError:
            pass
        return False
    _prune(dir_fd, keep=name)
    return True


def _prune(dir_fd, keep):
    """Drop the oldest entries beyond ``MAX_ENTRIES`` and temporary files that a writer
    left (it died) more than an hour ago."""
    try:
        ages = {}
        for name in os.listdir(dir_fd):
            if name != keep:
                ages[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        stale = [n for n in ages if n.startswith(".") and ages[n] < time.time() - 3600]
        names = sorted((n for n in ages if not n.startswith(".")), key=ages.__getitem__)
        for old in stale + names[: max(0, len(names) + 1 - MAX_ENTRIES)]:
            os.unlink(old, dir_fd=dir_fd)
    except OSError:
        pass


# -- the start ------------------------------------------------------------------------


def boot(header, stream):
    """What ``protocol.LOADER`` calls with the header it read from ``stream`` (stdin):
    the package, installed from a full bundle or from the cache (see the module's
    docstring). Exits if stdin ends before the bundle it asked for."""
    digest = header.get(HASH_KEY)
    if digest is None:  # a full bundle
        return install(header)
    dir_fd, why = open_cache(create=False)
    if dir_fd is not None:
        try:
            found, why = read_entry(dir_fd, digest)
        finally:
            os.close(dir_fd)
        if found is not None:
            bundle, code = found
            _, _, data = bundle.partition(b"\n")
            package = install(json.loads(data.decode("utf-8")), code=code)
            package.CODE_FROM = "cache"
            return package
    message = {"v": header.get(VERSION_KEY), "event": NEED_CODE, "why": why}
    sys.stdout.buffer.write((json.dumps(message) + "\n").encode("utf-8"))
    sys.stdout.buffer.flush()
    ahead = []
    for _ in range(MAX_AHEAD_LINES):
        line = stream.readline()
        if not line or line.strip().isdigit():
            break
        ahead.append(line)
    else:
        raise SystemExit("sshpyk agent: no code after %d lines" % MAX_AHEAD_LINES)
    if not line:
        raise SystemExit(3)  # the local side went away before sending the code
    bundle = line + stream.read(int(line))
    sources = json.loads(bundle.partition(b"\n")[2].decode("utf-8"))
    code = {n: compile(s, _filename(PACKAGE, n), "exec") for n, s in sources.items()}
    package = install(sources, code=code)
    package.CODE_FROM = "upload"
    dir_fd, _ = open_cache(create=True) if bundle_hash(bundle) == digest else (None, None)
    if dir_fd is not None:
        try:
            write_entry(dir_fd, digest, bundle, code)
        finally:
            os.close(dir_fd)
    if ahead:
        replay = io.BufferedReader(_Replay(b"".join(ahead), stream))
        sys.stdin = io.TextIOWrapper(replay, encoding="utf-8")
    return package


class _Replay(io.RawIOBase):
    """stdin again: the lines read ahead of the bundle, then the rest of ``stream``."""

    def __init__(self, head, stream):
        super().__init__()
        self.head = head
        self.stream = stream

    def readable(self):
        return True

    def fileno(self):
        return self.stream.fileno()

    def readinto(self, buffer):
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.stream.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)

"""The ``discover`` request: the host's Pythons that can run Jupyter kernels, and the
kernelspecs each one offers (any language).

Candidates come from: ``conda``/``mamba``/``micromamba env list --json`` (when on the
PATH), ``~/.conda/environments.txt``, conda base installs, the common env roots
(ENV_ROOTS: virtualenvwrapper, pyenv, pipenv, conda and mamba envs dirs), the roots a
request adds (``roots``, searched two levels down), the active env, the PATH's
``python3``/``python`` (after the agent's pre-command: a ``module load`` shows here) and
the agent's own python. They are deduplicated by real path (an env's dir and its
python, a venv's python being a link to its base's), then each is asked, in parallel
(at most MAX_PARALLEL at once, each in a process group of its own, killed on its
timeout, its output capped: procgroup.run_bounded), by a short ``python -c QUERY`` that
prints its version, jupyter_client's and ipykernel's, and
``KernelSpecManager().get_all_specs()``. Nothing else is run. Relative paths (in
environments.txt, an env var) are skipped: the queries run in /. The
whole request is bounded by its ``limit`` (DISCOVER_TIMEOUT): what has not answered by
then is left out with a warning (a partial result).

Runs in a thread of its own, one discovery at a time (agent.py: it blocks up to
``timeout``, and the workers stay free for the kernels).
"""

import collections
import json
import os
import shutil
import sys
import threading
import time

from .procgroup import run_bounded

#: seconds the whole discovery may take (unless the request says otherwise)
DISCOVER_TIMEOUT = 30.0
#: seconds one python's query may take
QUERY_TIMEOUT = 20.0
#: seconds an env manager's listing may take (``conda env list``: the queries follow)
LIST_TIMEOUT = 12.0
#: queries running at once
MAX_PARALLEL = 8
#: pythons asked at most (the rest: a warning)
MAX_PYTHONS = 64
#: directory entries looked at per directory while searching a root
MAX_ENTRIES = 1000
#: levels below a root searched for envs: the common roots hold envs, the roots a
#: request adds may hold projects that hold envs (``~/code/x/.venv``)
DEFAULT_DEPTH = 1
SEARCH_DEPTH = 2

#: directories that hold envs, and what made them
ENV_ROOTS = (
    ("~/.virtualenvs", "venv"),
    ("~/venvs", "venv"),
    ("~/.venvs", "venv"),
    ("~/envs", "venv"),
    ("~/.pyenv/versions", "pyenv"),
    ("~/.local/share/virtualenvs", "pipenv"),
    ("~/micromamba/envs", "micromamba"),
    ("~/.local/share/mamba/envs", "micromamba"),
    ("~/miniconda3/envs", "conda"),
    ("~/anaconda3/envs", "conda"),
    ("~/miniforge3/envs", "conda"),
    ("~/mambaforge/envs", "conda"),
    ("~/.conda/envs", "conda"),
    ("/opt/conda/envs", "conda"),
)
#: conda installs whose base env is an env too
BASE_ENVS = (
    "~/miniconda3",
    "~/anaconda3",
    "~/miniforge3",
    "~/mambaforge",
    "~/micromamba",
    "/opt/conda",
)
#: env managers asked for their envs: (command, its arguments)
MANAGERS = (
    ("conda", ("env", "list", "--json")),
    ("mamba", ("env", "list", "--json")),
    ("micromamba", ("env", "list", "--json")),
)
#: never descended into while searching
SKIP_DIRS = frozenset(
    ("node_modules", "site-packages", "__pycache__", "pkgs", "lib", "include", "share")
)
#: hidden directories that are still searched (a project's env)
HIDDEN_ENVS = frozenset((".venv", ".env", ".conda"))
#: environment variables a query does not inherit (they would change what it finds)
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONINSPECT")

MARK = "SSHPYK-DISCOVER "

#: what each found python runs: Python 2.7 and 3.x syntax, prints one marked JSON line
QUERY = r"""
import json, os, sys
def version(name):
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:
        try:
            return getattr(__import__(name), '__version__', 'unknown')
        except Exception:
            return None
out = {'executable': sys.executable, 'prefix': sys.prefix,
       'version': sys.version.split()[0], 'jupyter_client': version('jupyter_client'),
       'ipykernel': version('ipykernel'), 'kernelspecs': [], 'error': None}
if out['jupyter_client']:
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        for name, found in sorted(KernelSpecManager().get_all_specs().items()):
            spec = found.get('spec') or {}
            out['kernelspecs'].append({
                'name': name, 'resource_dir': found.get('resource_dir') or '',
                'display_name': spec.get('display_name') or name,
                'language': spec.get('language') or '',
                'interrupt_mode': spec.get('interrupt_mode') or 'signal',
                'argv0': (spec.get('argv') or [''])[0]})
    except Exception as exc:
        out['error'] = '%s: %s' % (type(exc).__name__, exc)
sys.stdout.write('\n' + MARK + json.dumps(out) + '\n')
""".replace("MARK", repr(MARK))


class Candidate:
    """A python to ask: its path, the env's name and how it was found."""

    def __init__(self, python, env, kind, env_dir=None):
        self.python = python
        self.env = env
        self.kind = kind
        self.env_dir = env_dir
        self.answer = None
        self.problem = None

    def key(self):
        """Two candidates are one python if their env dir and executable are."""
        env_dir = self.env_dir or os.path.dirname(os.path.dirname(self.python))
        return (os.path.realpath(env_dir), os.path.realpath(self.python))


def discover(msg, home=None):
    """The answer to a ``discover`` request (``roots``: more dirs to search;
    ``search_only``: only those; ``limit``: seconds in all). ``home``: the home
    directory (the tests'), else ``~``."""
    start = time.monotonic()
    timeout = min(max(float(msg.get("limit") or DISCOVER_TIMEOUT), 0.1), 300.0)
    deadline = start + timeout
    home = home or os.path.expanduser("~")
    roots = [_expand(r, home) for r in (msg.get("roots") or []) if r]
    warnings = []
    candidates = find_candidates(home, roots, bool(msg.get("search_only")), deadline, warnings)
    if len(candidates) > MAX_PYTHONS:
        warnings.append(
            "%d Pythons found: only the first %d were asked" % (len(candidates), MAX_PYTHONS)
        )
        candidates = candidates[:MAX_PYTHONS]
    query_all(candidates, deadline)
    late = [c for c in candidates if c.answer is None and c.problem == "timeout"]
    if late:
        warnings.append(
            "partial result: %d Python(s) did not answer in time (%gs in all): %s"
            % (len(late), timeout, ", ".join(c.python for c in late[:5]))
        )
    pythons, skipped = sort_answers(candidates)
    return {
        "pythons": pythons,
        "skipped": skipped,
        "warnings": warnings,
        "elapsed": round(time.monotonic() - start, 3),
    }


# -- candidates ------------------------------------------------------------------------


def _expand(path, home):
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return os.path.abspath(path)


def env_python(env_dir):
    """The python of an env directory (a venv, a conda env, a Python install), or None."""
    if not (
        os.path.isfile(os.path.join(env_dir, "pyvenv.cfg"))
        or os.path.isdir(os.path.join(env_dir, "conda-meta"))
        or _has_lib_python(env_dir)
    ):
        return None
    for name in ("python3", "python"):
        path = os.path.join(env_dir, "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _has_lib_python(env_dir):
    try:
        names = os.listdir(os.path.join(env_dir, "lib"))
    except OSError:
        return False
    return any(n.startswith("python") for n in names[:MAX_ENTRIES])


def env_name(env_dir):
    """A project's ``.venv`` is named for the project."""
    name = os.path.basename(env_dir.rstrip("/")) or env_dir
    if name in (".venv", "venv", ".env", "env", ".conda"):
        parent = os.path.basename(os.path.dirname(env_dir.rstrip("/")))
        return parent or name
    return name


def search_root(root, depth, kind, deadline, found, seen):
    """Envs in ``root`` and up to ``depth`` levels below it (breadth first, bounded in
    entries, time and by the real paths already seen); none for a relative ``root``
    (``environments.txt``'s, an env var's)."""
    if not os.path.isabs(root):
        return  # relative to the agent's cwd; the queries run in /: another file
    queue = collections.deque([(root, 0)])
    while queue and time.monotonic() < deadline:  # ends: bounded depth, entries, seen
        path, level = queue.popleft()
        real = os.path.realpath(path)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        python = env_python(path)
        if python is not None:
            found.append(Candidate(python, env_name(path), kind, path))
            continue  # an env holds no envs (conda's base holds envs/: a root of its own)
        if level >= depth:
            continue
        try:
            names = sorted(os.listdir(path))[:MAX_ENTRIES]
        except OSError:
            continue
        for name in names:
            if name in SKIP_DIRS or (name.startswith(".") and name not in HIDDEN_ENVS):
                continue
            queue.append((os.path.join(path, name), level + 1))


def manager_envs(deadline, warnings):
    """The env dirs the env managers on the PATH list (asked in parallel, bounded)."""
    commands = []
    for name, args in MANAGERS:
        exe = shutil.which(name)
        if exe is None and name in ("conda", "micromamba"):
            exe = os.environ.get("CONDA_EXE" if name == "conda" else "MAMBA_EXE") or None
        if exe is not None and os.path.isfile(exe):
            commands.append((name, [exe, *args]))
    results = {}

    def ask(name, argv):
        results[name] = run_bounded(argv, min(LIST_TIMEOUT, deadline - time.monotonic()))

    threads = [threading.Thread(target=ask, args=c, daemon=True) for c in commands]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 3.0)
    dirs = []
    for name, _ in commands:
        out, problem = results.get(name, (None, "timeout"))
        try:
            envs = json.loads(out or "")["envs"] if problem is None else None
        except (ValueError, KeyError, TypeError):
            envs, problem = None, "unreadable output"
        if envs is None:
            warnings.append("`%s env list --json` failed: %s" % (name, problem))
            continue
        dirs.extend((str(e), name) for e in envs if e)
    return dirs


def find_candidates(home, roots, search_only, deadline, warnings):
    """Every python to ask, in order of preference (the first of duplicates stays)."""
    found = []
    seen = set()
    if not search_only:
        for env_dir, kind in manager_envs(deadline, warnings):
            search_root(env_dir, 0, kind, deadline, found, seen)
        try:
            with open(os.path.join(home, ".conda", "environments.txt"), encoding="utf-8") as f:
                listed = [line.strip() for line in f.readlines()[:MAX_ENTRIES]]
        except (OSError, UnicodeDecodeError):
            listed = []
        for env_dir in listed:
            if env_dir and not env_dir.startswith("#"):
                search_root(env_dir, 0, "conda", deadline, found, seen)
        mamba_root = os.environ.get("MAMBA_ROOT_PREFIX")
        if mamba_root:
            search_root(os.path.join(mamba_root, "envs"), 1, "micromamba", deadline, found, seen)
        for base in BASE_ENVS:
            search_root(_expand(base, home), 0, "conda", deadline, found, seen)
        for root, kind in ENV_ROOTS:
            search_root(_expand(root, home), DEFAULT_DEPTH, kind, deadline, found, seen)
    for root in roots:
        if os.path.isfile(root) and os.access(root, os.X_OK):  # a python, named
            found.append(Candidate(root, None, "search"))
        else:
            search_root(root, SEARCH_DEPTH, "search", deadline, found, seen)
    if not search_only:
        for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
            if os.environ.get(var):
                search_root(os.environ[var], 0, "active", deadline, found, seen)
        for name in ("python3", "python"):
            exe = shutil.which(name)
            if exe:
                found.append(Candidate(os.path.abspath(exe), None, "path"))
        if sys.executable:
            found.append(Candidate(sys.executable, None, "agent"))
    unique = {}
    for candidate in found:
        unique.setdefault(candidate.key(), candidate)
    return list(unique.values())


# -- queries ---------------------------------------------------------------------------


def query_env():
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def query(candidate, deadline):
    """Ask one python (in a worker thread of query_all)."""
    timeout = min(QUERY_TIMEOUT, deadline - time.monotonic())
    out, problem = run_bounded([candidate.python, "-c", QUERY], timeout, query_env())
    if problem is not None:
        candidate.problem = problem
        return
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            try:
                answer = json.loads(line[len(MARK) :])
            except ValueError:
                break
            if isinstance(answer, dict):
                candidate.answer = answer
                return
            break
    candidate.problem = "no answer"


def query_all(candidates, deadline):
    """Ask every candidate, MAX_PARALLEL at once; returns by the deadline (what has
    not answered then has ``problem`` "timeout")."""
    todo = collections.deque(candidates)

    def work():
        while time.monotonic() < deadline:  # ends when none is left, or at the deadline
            try:
                candidate = todo.popleft()
            except IndexError:
                return
            query(candidate, deadline)

    threads = [
        threading.Thread(target=work, name="discover", daemon=True)
        for _ in range(min(MAX_PARALLEL, len(todo)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:  # each query kills its python at the deadline: 3 s to reap it
        thread.join(max(0.0, deadline - time.monotonic()) + 3.0)
    for candidate in candidates:
        if candidate.answer is None and candidate.problem is None:
            candidate.problem = "timeout"


# -- answers ---------------------------------------------------------------------------


def _spec_dir(spec):
    """A kernelspec's resource dir (real), "" if it names none (or not absolutely)."""
    where = spec.get("resource_dir")
    return os.path.realpath(where) if isinstance(where, str) and os.path.isabs(where) else ""


def _runs_in(argv0, prefix):
    """Whether a kernelspec's argv[0] is the python of the env ``prefix`` (real)."""
    if not prefix or not os.path.isabs(argv0):
        return False
    return os.path.realpath(os.path.dirname(os.path.dirname(argv0))) == prefix


def sort_answers(candidates):
    """(pythons with jupyter_client, each with the kernelspecs that are its own;
    those skipped and why). A kernelspec in a directory every python sees (the
    user's, the system's) is listed once: with the python its argv names, else the
    first that offers it."""
    answered = []
    seen = set()
    skipped = []
    for c in candidates:
        a = c.answer
        if a is None:
            skipped.append({"python": c.python, "kind": c.kind, "reason": c.problem})
            continue
        prefix = a.get("prefix")  # realpath("") would be the agent's cwd: no prefix, ""
        prefix = os.path.realpath(prefix) if isinstance(prefix, str) and prefix else ""
        key = (prefix, os.path.realpath(a.get("executable") or c.python))
        if key in seen:
            continue
        seen.add(key)
        if not a.get("jupyter_client"):
            skipped.append({"python": c.python, "kind": c.kind, "reason": "no jupyter_client"})
            continue
        answered.append((c, a, prefix))
    owner = {}
    for index, (_, a, prefix) in enumerate(answered):
        for spec in a.get("kernelspecs") or []:
            where = _spec_dir(spec)
            if not where:
                continue  # no resource dir: nothing to share, it stays its python's
            if (prefix and where.startswith(prefix + os.sep)) or "-packages" + os.sep in where:
                continue  # the env's own (its share/jupyter, or a package's: ipykernel's)
            if _runs_in(spec.get("argv0") or "", prefix):
                owner[where] = index
            else:
                owner.setdefault(where, index)
    pythons = []
    for index, (c, a, prefix) in enumerate(answered):
        specs = []
        for spec in a.get("kernelspecs") or []:
            if owner.get(_spec_dir(spec), index) == index:
                specs.append(spec)
        executable = a.get("executable") or c.python
        pythons.append(
            {
                "python": executable if os.path.isabs(executable) else c.python,
                "env": c.env or _prefix_name(prefix),
                "kind": c.kind,
                "prefix": a.get("prefix"),
                "version": a.get("version"),
                "jupyter_client": a.get("jupyter_client"),
                "ipykernel": a.get("ipykernel"),
                "kernelspecs": specs,
                "error": a.get("error"),
            }
        )
    return pythons, skipped


def _prefix_name(prefix):
    if not prefix:
        return "python"
    if prefix in ("/usr", "/usr/local", "/"):
        return "system"
    return env_name(prefix)

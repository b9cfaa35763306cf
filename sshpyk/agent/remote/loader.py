"""Installs the agent's modules from their sources, on the remote host.

``protocol.LOADER`` (the remote command line) reads the bundle, runs this module's
source and calls :func:`install`, which turns ``{module: source}`` (in dependency
order: a module imports only those before it) into the package ``protocol.PACKAGE``
in ``sys.modules``; a ``load`` request adds more modules (a batch launcher's) the
same way. The package keeps every source it was given (``SOURCES``), so the agent
can send itself on, to an execution host (see batch.py). Nothing is written to disk.

Stdlib only and no imports of the package: it runs before the package exists.
"""

import json
import sys
import types

PACKAGE = "sshpyk_agent"  # protocol.PACKAGE; this module cannot import it


def install(sources, name=PACKAGE):
    """Create (or extend) the package ``name`` with the modules in ``sources``
    (``{module: source}``, in dependency order); modules it has already are skipped.
    Returns the package."""
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
            module.__file__ = "<%s/%s.py>" % (name, module_name)
            sys.modules[full] = module
            try:
                exec(compile(source, module.__file__, "exec"), module.__dict__)
            except BaseException:
                del sys.modules[full]
                raise
            setattr(package, module_name, module)
        package.SOURCES.setdefault(module_name, source)
    return package


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

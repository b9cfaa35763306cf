"""Kernelspecs as the remote environment's jupyter_client finds them."""

import importlib.util
import json
import os
import sys

from .protocol import AgentError, Kind


def require_jupyter_client():
    if importlib.util.find_spec("jupyter_client") is None:
        raise AgentError(
            Kind.JUPYTER_CLIENT_MISSING,
            "jupyter_client is not installed for %s" % sys.executable,
        )


def jupyter_client_version():
    if importlib.util.find_spec("jupyter_client") is None:
        return None
    try:
        from importlib.metadata import version

        return version("jupyter_client")
    except Exception:
        return "unknown"


def native_python_spec():
    if importlib.util.find_spec("ipykernel") is None:
        return None
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {"debugger": True},
    }


def find_kernelspec(name):
    """Resolve a kernelspec like jupyter_client's KernelSpecManager does.

    Walks jupyter_core's kernel search path directly (importing jupyter_client
    costs ~0.25 s, which would be paid on every kernel start); falls back to
    KernelSpecManager for anything the fast path does not find.
    """
    require_jupyter_client()
    wanted = name.lower()
    try:
        from jupyter_core.paths import jupyter_path

        dirs = jupyter_path("kernels")
    except Exception:
        dirs = []
    for kernel_dir in dirs:
        if not os.path.isdir(kernel_dir):
            continue
        for entry in sorted(os.listdir(kernel_dir)):
            path = os.path.join(kernel_dir, entry)
            spec_file = os.path.join(path, "kernel.json")
            if entry.lower() == wanted and os.path.isfile(spec_file):
                with open(spec_file, encoding="utf-8") as f:
                    spec = json.load(f)
                spec["resource_dir"] = path
                return spec
    if wanted == "python3":
        spec = native_python_spec()
        if spec is not None:
            spec["resource_dir"] = "(ipykernel built-in)"
            return spec
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except Exception as exc:
        raise AgentError(
            Kind.JUPYTER_CLIENT_MISSING, "cannot import jupyter_client: %s" % exc
        ) from None
    try:
        ks = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise AgentError(
            Kind.KERNELSPEC_NOT_FOUND,
            "no kernelspec named %r for %s (available: %s)"
            % (name, sys.executable, ", ".join(sorted(available_kernels(dirs))) or "none"),
        ) from None
    spec = ks.to_dict()
    spec["resource_dir"] = ks.resource_dir
    return spec


def available_kernels(dirs):
    names = set()
    for kernel_dir in dirs:
        if os.path.isdir(kernel_dir):
            for entry in os.listdir(kernel_dir):
                if os.path.isfile(os.path.join(kernel_dir, entry, "kernel.json")):
                    names.add(entry.lower())
    if native_python_spec() is not None:
        names.add("python3")
    return names


def kernel_argv(spec, connection_file):
    argv = list(spec.get("argv") or [])
    if not argv:
        raise AgentError(Kind.LAUNCH_FAILED, "the remote kernelspec has an empty argv")
    major = "python%d" % sys.version_info[0]
    minor = "python%d.%d" % sys.version_info[:2]
    if argv[0] in ("python", major, minor):
        argv[0] = sys.executable  # what jupyter_client does for local kernels
    subst = {
        "{connection_file}": connection_file,
        "{resource_dir}": spec.get("resource_dir", ""),
        "{prefix}": sys.prefix,
    }
    out = []
    for arg in argv:
        for k, v in subst.items():
            arg = arg.replace(k, v)
        out.append(arg)
    return out


def describe_kernelspec(name):
    """The ``info`` answer to ``inspect``: the kernelspec ``name``, without its env."""
    spec = find_kernelspec(name)
    keys = ("argv", "display_name", "language", "interrupt_mode", "resource_dir")
    return {k: spec.get(k) for k in keys}

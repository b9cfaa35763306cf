"""KernelConfig, the one model of a kernel's options, and everything derived from it:
kernel.json (both ways), the provisioner's traits, the options of add/edit, check's
target, KernelOptions and the launch request. No sshd needed."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest

from sshpyk import KernelOptions, SSHKernelSpec, values
from sshpyk.agent.client import LaunchRequest
from sshpyk.cli.kernels import add, edit
from sshpyk.config import DEFAULTS, KernelConfig, Store, config_field, config_fields
from sshpyk.diagnostics.check import CheckTarget
from sshpyk.errors import SSHPykError
from sshpyk.kernelspec import edited_spec, load_spec, save_edited_spec, spec_changes, write_spec
from sshpyk.provisioner import SSHKernelProvisioner
from sshpyk.values import parse_forward

#: a value other than the default for every field (the fixture makes the ssh config)
NON_DEFAULT: dict[str, Any] = {
    "name": "ssh_every",
    "ssh_host_alias": "gpubox",
    "display_name": "Every option",
    "language": "julia",
    "interrupt_mode": "message",
    "ssh_config": "{ssh_config}",
    "remote_python": "/opt/conda/envs/torch",
    "remote_kernel_name": "ir",
    "start_timeout": 12.5,
    "transport": "tcp",
    "remote_env": {"A": "1", "B": "x y"},
    "pre_command": "module load cuda",
    "remote_cwd": "/srv",
    "remote_run_root": "/scratch/me",
    "grace_period": 600.0,
    "link_grace": 7200.0,
    "connection_persist": 120.0,
    "outage_buffer": 16.0,
    "prestart": 2,
    "persistent": True,
    "idle_timeout": 3600.0,
    "launcher": "slurm",
    "sge_args": "-pe smp 4 -q gpu.q",
    "sge_queue_timeout": 40.0,
    "sge_walltime_warning": 60.0,
    "sge_status_interval": 6.0,
    "slurm_args": "--partition=gpu --time=04:00:00",
    "slurm_queue_timeout": 30.0,
    "slurm_walltime_warning": 0.0,
    "slurm_status_interval": 5.0,
    "forward": ["8787", "15432:db.internal:5432"],
    "auto_forward": False,
    "local_transport": "tcp",
}

#: kernel.json files as the previous sshpyk wrote them (SSHKernelSpec.to_kernel_json)
OLD_DIRECT = {
    "argv": ["sshpyk-remote-kernel", "gpubox", "python3", "{connection_file}"],
    "display_name": "python3 (gpubox)",
    "language": "python",
    "interrupt_mode": "signal",
    "metadata": {
        "kernel_provisioner": {
            "provisioner_name": "sshpyk-provisioner",
            "config": {
                "ssh_host_alias": "gpubox",
                "remote_python": "/opt/py",
                "remote_kernel_name": "python3",
                "start_timeout": 30.0,
                "transport": "auto",
                "remote_env": {"A": "1"},
                "pre_command": "module load x",
                "grace_period": 60.0,
                "persistent": False,
            },
        }
    },
}
OLD_SLURM = {
    "argv": ["sshpyk-remote-kernel", "hpc", "python3", "{connection_file}"],
    "display_name": "HPC",
    "language": "python",
    "interrupt_mode": "signal",
    "metadata": {
        "kernel_provisioner": {
            "provisioner_name": "sshpyk-provisioner",
            "config": {
                "ssh_host_alias": "hpc",
                "remote_python": "python3",
                "remote_kernel_name": "python3",
                "start_timeout": 60.0,
                "transport": "tcp",
                "grace_period": 60.0,
                "persistent": False,
                "launcher": "slurm",
                "slurm_args": "--partition=gpu",
                "slurm_queue_timeout": 600.0,
                "slurm_walltime_warning": 300.0,
            },
        }
    },
}


@pytest.fixture
def every(tmp_path: Path) -> SSHKernelSpec:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host gpubox\n  HostName 127.0.0.1\n")
    values = {**copy.deepcopy(NON_DEFAULT), "ssh_config": str(ssh_config)}
    return SSHKernelSpec(**values)


def install(data_dir: Path, name: str, data: dict[str, Any]) -> Path:
    path = data_dir / "kernels" / name
    path.mkdir(parents=True)
    (path / "kernel.json").write_text(json.dumps(data))
    return path


def test_the_table_covers_every_field_with_another_value() -> None:
    assert set(NON_DEFAULT) == {f.name for f in config_fields()}
    for f in config_fields():
        assert NON_DEFAULT[f.name] != f.default, f.name


def test_round_trip_of_every_field(every: SSHKernelSpec) -> None:
    path = write_spec(every)
    loaded = load_spec(every.name)
    assert loaded == every
    assert loaded.resource_dir == path
    config = json.loads((Path(path) / "kernel.json").read_text())["metadata"]
    stored = config["kernel_provisioner"]["config"]
    assert set(stored) == {f.name for f in config_fields(Store.PROVISIONER)}


def test_round_trip_of_the_defaults(isolated_jupyter: Path) -> None:
    spec = SSHKernelSpec(name="plain", ssh_host_alias="gpubox", display_name="Plain")
    write_spec(spec)
    assert load_spec("plain") == spec
    data = json.loads((isolated_jupyter / "kernels" / "plain" / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    # a direct kernel at its defaults stores no SLURM key, and no option newer than them
    assert not [k for k in config if k == "launcher" or k.startswith("slurm_")], config
    assert "local_transport" not in config


@pytest.mark.parametrize("old", [OLD_DIRECT, OLD_SLURM], ids=["direct", "slurm"])
def test_old_kernel_json_loads_and_is_written_back_unchanged(old: dict[str, Any]) -> None:
    spec = SSHKernelSpec.from_kernel_json("old", copy.deepcopy(old))
    config = old["metadata"]["kernel_provisioner"]["config"]  # type: ignore[index]
    for key, value in config.items():
        assert getattr(spec, key) == value, key
    assert spec.extra == {}
    written = spec.to_kernel_json()
    # everything is written back as it was, but the argv: the old one named a command
    # that never existed; the new one runs the argv launcher
    assert written["argv"] == spec.launcher_argv()
    assert {**written, "argv": old["argv"]} == old


def test_old_kernel_json_with_missing_keys_takes_the_defaults() -> None:
    data = {
        "argv": ["x"],
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "sshpyk-provisioner",
                "config": {"ssh_host_alias": "gpubox", "start_timeout": 30},
            }
        },
    }
    spec = SSHKernelSpec.from_kernel_json("bare", data, resource_dir="/somewhere")
    assert spec.start_timeout == 30.0 and isinstance(spec.start_timeout, float)
    assert spec.resource_dir == "/somewhere"
    for f in config_fields():
        if f.name not in ("name", "ssh_host_alias", "start_timeout"):
            assert getattr(spec, f.name) == f.default, f.name


def test_not_an_sshpyk_kernel() -> None:
    with pytest.raises(SSHPykError, match="not an sshpyk kernel"):
        KernelConfig.from_kernel_json("loc", {"argv": ["python"], "display_name": "L"})


def test_unknown_keys_are_kept_on_edit(isolated_jupyter: Path) -> None:
    data = copy.deepcopy(OLD_DIRECT)
    config = data["metadata"]["kernel_provisioner"]["config"]  # type: ignore[index]
    config.update({"slurm_status_interval": 1.0, "from_a_newer_sshpyk": {"x": [1, 2]}})
    path = install(isolated_jupyter, "ssh_keep", data)
    old = load_spec("ssh_keep")
    assert old.slurm_status_interval == 1.0
    assert old.extra == {"from_a_newer_sshpyk": {"x": [1, 2]}}
    new = edited_spec(old, {"display_name": "X"})
    assert spec_changes(old, new) == [("display_name", "python3 (gpubox)", "X")]
    save_edited_spec(old, new)
    written = json.loads((path / "kernel.json").read_text())
    stored = written["metadata"]["kernel_provisioner"]["config"]
    assert stored["slurm_status_interval"] == 1.0
    assert stored["from_a_newer_sshpyk"] == {"x": [1, 2]}
    assert written["display_name"] == "X"


def test_edit_clears_and_refuses_empty() -> None:
    spec = SSHKernelSpec.from_kernel_json("k", copy.deepcopy(OLD_DIRECT))
    cleared = edited_spec(spec, {"pre_command": "", "display_name": ""})
    assert cleared.pre_command is None
    assert cleared.display_name == "python3 (gpubox)"
    for name in ("remote_python", "ssh_host_alias", "remote_kernel_name", "language"):
        with pytest.raises(SSHPykError, match="cannot be empty"):
            edited_spec(spec, {name: " "})
    with pytest.raises(SSHPykError, match="is not a kernelspec field"):
        edited_spec(spec, {"resource_dir": "/x"})


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "bad name"}, "invalid kernel name 'bad name'"),
        ({"ssh_host_alias": ""}, "SSH host alias is required (--ssh-host-alias)"),
        ({"remote_python": "-x"}, "starts with '-'"),
        ({"transport": "udp"}, "transport must be one of auto, ipc, tcp"),
        ({"interrupt_mode": "poke"}, "interrupt mode must be one of signal, message"),
        ({"local_transport": "udp"}, "local transport must be one of ipc, tcp"),
        ({"launcher": "pbs"}, "launcher must be one of direct, sge, slurm"),
        ({"start_timeout": 0.0}, "start timeout must be a positive number of seconds"),
        ({"grace_period": -1.0}, "grace period must be a positive number of seconds"),
        ({"slurm_queue_timeout": 0.0}, "SLURM queue timeout must be a positive"),
        ({"slurm_status_interval": 0.0}, "SLURM status interval must be a positive"),
        ({"slurm_walltime_warning": -1.0}, "must be 0 (off) or a number of seconds"),
        ({"ssh_config": "/nonexistent/config"}, "/nonexistent/config does not exist"),
        ({"slurm_args": "--output=/tmp/x"}, "--output is set by sshpyk"),
        ({"forward": ["0"]}, "--forward '0': the port 0 is not a port number (1-65535)"),
        ({"forward": ["70000"]}, "the port 70000 is not a port number (1-65535)"),
        ({"forward": ["tensorboard"]}, "the port 'tensorboard' is not a port number"),
        ({"forward": ["8080:db:x"]}, "the remote port 'x' is not a port number"),
        ({"forward": ["8080:5432"]}, "use PORT or LOCAL_PORT:REMOTE_HOST:REMOTE_PORT"),
        ({"forward": ["8080:a b:80"]}, "'a b' is not a host name or address"),
        ({"forward": ["9000", "9000:h:1"]}, "local port 9000 is forwarded twice"),
    ],
)
def test_validation(changes: dict[str, Any], words: str) -> None:
    spec = SSHKernelSpec(name="ok", ssh_host_alias="gpubox")
    spec.validate()
    for name, value in changes.items():
        setattr(spec, name, value)
    with pytest.raises(SSHPykError) as info:
        spec.validate()
    assert words in str(info.value)


def test_forward_values() -> None:
    assert parse_forward("8787") == (8787, "localhost", 8787)
    assert parse_forward(" 18787:node17:8787 ") == (18787, "node17", 8787)
    assert parse_forward("8080:[::1]:80") == (8080, "::1", 80)


def test_a_privileged_local_port_is_refused_unless_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check uses the real rule (Linux's ip_unprivileged_port_start, else 1024) and
    the real euid; here the euid is made that of a user."""
    monkeypatch.setattr(values.os, "geteuid", lambda: 1000)
    start = values._unprivileged_start()
    if start == 0:
        pytest.skip("this host lets every user listen on every port")
    with pytest.raises(SSHPykError) as info:
        parse_forward(f"{start - 1}:localhost:80")
    assert f"local port {start - 1} is privileged" in str(info.value)
    assert "\n" not in str(info.value)
    assert parse_forward(f"{start}:localhost:80")[0] == start
    monkeypatch.setattr(values.os, "geteuid", lambda: 0)
    assert parse_forward("80:localhost:80")[0] == 80


def test_provisioner_traits_are_the_provisioner_options() -> None:
    traits = SSHKernelProvisioner.class_traits(config=True)
    expected = {f.name: f for f in config_fields(Store.PROVISIONER)}
    assert set(traits) == set(expected)
    provisioner = SSHKernelProvisioner(kernel_id="k", kernel_spec=None, parent=None)
    for name, f in expected.items():
        assert getattr(provisioner, name) == f.default, name
        assert traits[name].help == f.help
        assert traits[name].allow_none == f.optional, name
        if f.option.choices:
            assert list(traits[name].values) == list(f.option.choices), name
    # top-level kernel.json keys and the name are not provisioner options
    assert not {"name", "display_name", "language", "interrupt_mode"} & set(traits)


def test_provisioner_options_come_from_its_traits() -> None:
    values = {k: v for k, v in NON_DEFAULT.items() if config_field(k).store is Store.PROVISIONER}
    provisioner = SSHKernelProvisioner(kernel_id="k", kernel_spec=None, parent=None, **values)
    expected = KernelOptions.from_config(KernelConfig(**values))
    assert provisioner._options() == expected
    assert expected.slurm_args == ["--partition=gpu", "--time=04:00:00"]
    assert provisioner.get_stable_start_time() == 12.5 + 30.0  # start + SLURM queue


def flags(command: Any) -> dict[str, Any]:
    return {p.name: p for p in command.params}


def default(command: Any, param: Any) -> Any:
    """What the command gets when the option is not given."""
    return command.make_context(command.name, [], resilient_parsing=True).params[param.name]


@pytest.mark.parametrize("command", [add, edit], ids=["add", "edit"])
def test_add_and_edit_have_an_option_per_field(command: Any) -> None:
    params = flags(command)
    for f in config_fields():
        param = params[f.name]
        assert f.flag in param.opts, f.name
        if f.type is bool:
            assert param.secondary_opts == [f"--no-{f.flag[2:]}"]
        given = default(command, param)
        if command is edit:
            assert given in (None, ()), f.name  # not given: keep what is stored
        elif given not in (None, ()):
            assert given == f.default, f.name
        if f.option.choices:
            assert list(param.type.choices) == list(f.option.choices), f.name
    others = set(params) - {f.name for f in config_fields()}
    discovery = {"discover", "add_all", "select", "search", "search_only", "as_json", "timeout"}
    own = {"kernel", "unset_remote_env"} if command is edit else discovery
    assert others == {"replace", "no_check"} | own


def test_add_defaults_are_the_model_defaults() -> None:
    params = flags(add)
    shown = {name: default(add, p) for name, p in params.items() if p.show_default}
    assert shown == {
        "remote_python": "python3",
        "remote_kernel_name": "python3",
        "start_timeout": 60.0,
        "transport": "auto",
        "grace_period": 30.0,
        "connection_persist": 600.0,
        "link_grace": 3600.0,
        "outage_buffer": 64.0,
        "prestart": 0,
        "idle_timeout": 0.0,
        "launcher": "direct",
        "sge_queue_timeout": 600.0,
        "sge_walltime_warning": 300.0,
        "sge_status_interval": 30.0,
        "slurm_queue_timeout": 600.0,
        "slurm_walltime_warning": 300.0,
        "slurm_status_interval": 30.0,
        "local_transport": "ipc",
    }
    assert params["name"].required and params["ssh_host_alias"].required


def test_kernel_options_are_the_kernel_fields_of_the_model(every: SSHKernelSpec) -> None:
    kernel_names = {f.option.kernel: f for f in config_fields() if f.option.kernel}
    defaults = KernelOptions()
    own = {f.name for f in fields(KernelOptions)} - {"launcher_options"}
    assert own | set(defaults.launcher_options) == set(kernel_names)
    assert not own & set(defaults.launcher_options)  # the launchers' own options
    for name, f in kernel_names.items():
        expected = [] if name in ("sge_args", "slurm_args") else f.default
        assert getattr(defaults, name) == expected, name
    options = KernelOptions.from_config(every)
    for name, f in kernel_names.items():
        if name not in ("sge_args", "slurm_args"):
            assert getattr(options, name) == getattr(every, f.name), name


def test_launch_request_is_what_the_agent_reads(every: SSHKernelSpec) -> None:
    options = KernelOptions.from_config(every)
    request = options.launch_request("the-key", "hmac-sha256", {"JPY_SESSION_NAME": "nb"})
    assert isinstance(request, LaunchRequest)
    assert (request.launcher, request.persistent) == ("slurm", True)
    message = request.message("kid1")
    assert message == {
        "op": "launch",
        "kid": "kid1",
        "key": "the-key",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "ir",
        "transport": "tcp",
        "env": {"A": "1", "B": "x y", "JPY_SESSION_NAME": "nb"},
        "cwd": "/srv",
        "persistent": True,
        "launcher": "slurm",
        "slurm_args": ["--partition=gpu", "--time=04:00:00"],
        "slurm_queue_timeout": 30.0,
        "slurm_walltime_warning": 0.0,
        "slurm_status_interval": 5.0,
        "outage_buffer": 16.0,
        "prestart": 2,
        "idle_timeout": 3600.0,
        "auto_forward": False,
    }
    assert options.env == {"A": "1", "B": "x y"}  # the extra env is not kept
    assert LaunchRequest("k").launcher == DEFAULTS.launcher


def test_check_target_is_the_kernel_options_of_the_spec(every: SSHKernelSpec) -> None:
    target = CheckTarget.from_spec(every)
    assert (target.alias, target.ssh_config, target.kernel) == (
        "gpubox",
        every.ssh_config,
        "ssh_every",
    )
    options = asdict(KernelOptions.from_config(every))
    for f in fields(CheckTarget):
        if f.name in options:
            assert getattr(target, f.name) == options[f.name], f.name
    test_kernel = target.kernel_options()
    assert test_kernel.python == every.remote_python
    assert test_kernel.grace == DEFAULTS.grace_period  # a test kernel: the default grace
    bare = CheckTarget(alias="gpubox")
    assert (bare.python, bare.kernel_name, bare.start_timeout) == ("python3", "python3", 60.0)

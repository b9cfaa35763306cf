"""`sshpyk check` walks the connect path kernels take, ProxyJump hops included.

Regression: `sshpyk check ALIAS --ssh-config FILE` for a host behind a ProxyJump that
FILE defines failed with "unknown host" (the hop was looked up without FILE), while
kernels through the same host worked. The loopback sshd is its own bastion here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sshpyk import SSHSession

from support.cli import sshpyk

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jump_config(sshd, tmp_path: Path) -> Path:
    """A config (not ~/.ssh/config) whose only way to 'pj-target' is via 'pj-bastion'."""
    common = f"""  HostName 127.0.0.1
  Port {sshd.port}
  User {sshd.user}
  IdentityFile {sshd.root / "id_ed25519"}
  IdentitiesOnly yes
  UserKnownHostsFile {sshd.known_hosts}
"""
    config = tmp_path / "ssh_config_proxyjump"
    config.write_text(
        f"Host pj-target\n{common}  ProxyJump pj-bastion\n\n"
        f"Host pj-bastion\n{common}\n"
        # a Host that only this file knows, as the middle of a two-hop chain
        f"Host pj-deep\n{common}  ProxyJump pj-bastion,pj-target\n"
    )
    return config


@pytest.mark.parametrize("alias", ["pj-target", "pj-deep"])
def test_check_behind_a_proxyjump_of_the_given_config(sshd, jump_config, alias) -> None:
    result = sshpyk("check", alias, "--ssh-config", str(jump_config), "--no-kernel", "--json")
    found = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    for stage in ("config", "tcp", "hostkey", "auth", "python"):
        assert found[stage]["status"] == "ok", (stage, found[stage], result.stderr)
    assert "unknown host" not in result.output
    assert "via ProxyJump pj-bastion" in found["tcp"]["detail"], found["tcp"]
    assert f"logged in as {sshd.user}" in found["auth"]["detail"]
    assert result.exit_code == 0, result.output


async def test_kernels_take_the_same_path(sshd, jump_config) -> None:
    """What check now agrees with: a session through the same hop works."""
    async with await SSHSession.connect("pj-target", ssh_config=jump_config) as session:
        assert type(session) is SSHSession  # the public class, not the SSH layer's handle
        result = await session.run("echo ok")
        assert session.shared.bastion is not None
        assert session.shared.bastion.alias == "pj-bastion"
    assert result.stdout.strip() == "ok"


def test_check_names_a_bastion_that_fails(sshd, jump_config) -> None:
    """A bastion with a changed host key: the target is not reached (tcp), and the fix
    is the bastion's."""
    changed = sshd.root / "known_hosts_changed"
    text = jump_config.read_text() + (
        f"\nHost pj-bad\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.root / 'id_ed25519'}\n  UserKnownHostsFile {changed}\n"
        f"\nHost pj-behind-bad\n  HostName 127.0.0.1\n  Port {sshd.port}\n"
        f"  UserKnownHostsFile {sshd.known_hosts}\n  ProxyJump pj-bad\n"
    )
    jump_config.write_text(text)
    result = sshpyk("check", "pj-behind-bad", "--ssh-config", str(jump_config), "--json")
    assert result.exit_code == 1
    found = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert found["config"]["status"] == "ok"
    assert found["tcp"]["status"] == "fail", found["tcp"]
    assert "through bastion 'pj-bad'" in found["tcp"]["detail"], found["tcp"]
    assert "CHANGED" in found["tcp"]["detail"]
    assert "man-in-the-middle" in found["tcp"]["fix"], found["tcp"]
    assert {found[s]["status"] for s in ("hostkey", "auth", "python")} == {"skip"}
    assert "Traceback" not in result.output

"""`sshpyk delete`: confirms, refuses non-SSH kernels unless --force, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

from support.cli import assert_one_line_error, sshpyk


def local_kernel(data_dir: Path, name: str = "loc") -> Path:
    path = data_dir / "kernels" / name
    path.mkdir(parents=True)
    (path / "kernel.json").write_text(json.dumps({"argv": ["x"], "display_name": "L"}))
    return path


def test_delete_confirms(make_kernelspec) -> None:
    path = Path(make_kernelspec("ssh_a").resource_dir)
    result = sshpyk("delete", "ssh_a", input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert path.exists()
    result = sshpyk("delete", "ssh_a", input="y\n")
    assert result.exit_code == 0, result.output
    assert f"Delete ssh_a ({path})?" in result.output
    assert f"Deleted kernel 'ssh_a' ({path})" in result.stdout
    assert not path.exists()


def test_delete_several_with_yes(make_kernelspec) -> None:
    paths = [Path(make_kernelspec(name).resource_dir) for name in ("ssh_a", "ssh_b")]
    result = sshpyk("delete", "--yes", "ssh_a", "ssh_b")
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in paths)
    assert "?" not in result.output  # no prompt


def test_delete_refuses_non_ssh_kernels_unless_forced(make_kernelspec, isolated_jupyter) -> None:
    ssh = Path(make_kernelspec("ssh_a").resource_dir)
    loc = local_kernel(isolated_jupyter)
    assert_one_line_error(
        sshpyk("delete", "-y", "ssh_a", "loc"), "'loc' is not an SSH kernel", "--force"
    )
    assert ssh.exists() and loc.exists()  # all or nothing
    result = sshpyk("delete", "-y", "--force", "ssh_a", "loc")
    assert result.exit_code == 0, result.output
    assert not ssh.exists() and not loc.exists()


def test_delete_unknown_kernel_deletes_nothing(make_kernelspec) -> None:
    ssh = Path(make_kernelspec("ssh_a").resource_dir)
    assert_one_line_error(sshpyk("delete", "-y", "ssh_a", "nope"), "no kernel named 'nope'")
    assert ssh.exists()
    result = sshpyk("delete")
    assert result.exit_code == 2 and "Missing argument" in result.stderr


def test_delete_unreadable_kernel_is_one_line(isolated_jupyter) -> None:
    path = isolated_jupyter / "kernels" / "broken"
    path.mkdir(parents=True)
    (path / "kernel.json").write_text("{not json")
    assert_one_line_error(sshpyk("delete", "-y", "broken"), "cannot read")
    assert path.exists()

"""Notebook runners on an SSH kernel: nbclient, and papermill on top of it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

MISSING = "{} is missing (pip install -e '.[clients]')"
nbformat = pytest.importorskip("nbformat", reason=MISSING.format("nbformat"))
nbclient = pytest.importorskip("nbclient", reason=MISSING.format("nbclient"))

pytestmark = pytest.mark.timeout(180)

WHOAMI = (
    "import os, socket\n"
    "print(socket.gethostname(), os.getpid(), os.environ.get('SSH_CONNECTION'), sep='\\n')"
)


def _notebook(kernel: str, *sources: str) -> Any:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    return nb


def _stdout(cell: Any) -> str:
    return "".join(o["text"] for o in cell.outputs if o.get("name") == "stdout")


def _check_remote(text: str, sshd_port: int, run_root: Path) -> None:
    host, pid, ssh_connection = text.strip().splitlines()
    assert host == socket.gethostname()
    assert ssh_connection.split()[2:] == ["127.0.0.1", str(sshd_port)], ssh_connection
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert str(run_root).encode() in cmdline  # the kernel sshpyk started, still running


async def test_nbclient_executes_notebook(make_kernelspec, sshd, run_root, no_leftovers) -> None:
    make_kernelspec("ssh_nbclient")
    nb = _notebook(
        "ssh_nbclient",
        WHOAMI,
        "answer = 6 * 7\nanswer",
        "from IPython.display import HTML, display\ndisplay(HTML('<b>remote</b>'))",
        "import sys\nprint('to stderr', file=sys.stderr)",
    )
    # The kernel name comes from the notebook's metadata, as for any notebook.
    client = nbclient.NotebookClient(nb, timeout=60, startup_timeout=60)
    remote_output: list[str] = []

    async def on_cell_executed(cell: Any, cell_index: int, execute_reply: Any) -> None:
        if cell_index == 0:  # checked while the kernel still runs
            remote_output.append(_stdout(cell))
            _check_remote(_stdout(cell), sshd.port, run_root)

    client.on_cell_executed = on_cell_executed
    await client.async_execute()

    assert remote_output, "the first cell's hook did not run"
    _whoami, answer, html, stderr = nb.cells
    assert [c.execution_count for c in nb.cells] == [1, 2, 3, 4]
    assert answer.outputs[0]["output_type"] == "execute_result"
    assert answer.outputs[0]["data"]["text/plain"] == "42"
    assert html.outputs[0]["output_type"] == "display_data"
    assert html.outputs[0]["data"]["text/html"] == "<b>remote</b>"
    assert stderr.outputs[0]["name"] == "stderr" and stderr.outputs[0]["text"] == "to stderr\n"
    assert client.km is None or not client.km.has_kernel  # nbclient shut the kernel down
    no_leftovers()


async def test_nbclient_cell_error_is_reported(make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_nbclient_err")
    nb = _notebook("ssh_nbclient_err", "x = 1", "x / 0", "print('not reached')")
    client = nbclient.NotebookClient(nb, timeout=60, startup_timeout=60)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as excinfo:
        await client.async_execute()
    assert excinfo.value.ename == "ZeroDivisionError"
    assert nb.cells[1].outputs[0]["ename"] == "ZeroDivisionError"
    assert nb.cells[2].outputs == []
    no_leftovers()


def test_papermill_runs_parameterized_notebook(
    make_kernelspec, sshd, tmp_path: Path, no_leftovers
) -> None:
    papermill = pytest.importorskip("papermill", reason=MISSING.format("papermill"))
    make_kernelspec("ssh_papermill")
    nb = _notebook(
        "ssh_papermill",
        "greeting = 'default'",
        "import os\nprint(greeting, os.environ['SSH_CONNECTION'].split()[3])",
    )
    nb.cells[0].metadata["tags"] = ["parameters"]
    source, result = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(
        str(source),
        str(result),
        parameters={"greeting": "hello from papermill"},
        progress_bar=False,
        start_timeout=60,
        execution_timeout=60,
    )
    out = nbformat.read(result, as_version=4)
    assert not out.metadata["papermill"]["exception"]
    assert [c.metadata["papermill"]["status"] for c in out.cells] == ["completed"] * 3
    assert "injected-parameters" in out.cells[1].metadata["tags"]
    printed = _stdout(out.cells[-1])
    assert printed == f"hello from papermill {sshd.port}\n"
    no_leftovers()

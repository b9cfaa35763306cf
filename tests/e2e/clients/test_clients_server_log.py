"""What a real Jupyter Server logs for an SSH kernel: each launch stage with its duration
at INFO, and never the kernel's HMAC key or its connection file, at any level.

The server runs with ``--debug``, with sshpyk's and asyncssh's own loggers routed into
its log at DEBUG too, through a kernel's whole life over the REST API and a websocket:
start, execute, interrupt, restart, execute, shutdown.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from support.jupyter_server import JupyterServer, artifacts_dir

pytest.importorskip("jupyter_server", reason="jupyter_server is missing ('.[clients]')")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KERNEL = "ssh_log"
#: every logger that could carry a secret, at DEBUG, into the server's log
LOGGING = {
    "ServerApp": {
        "logging_config": {
            "loggers": {
                name: {"level": "DEBUG", "handlers": ["console"], "propagate": False}
                for name in ("sshpyk", "asyncssh")
            }
        }
    }
}
#: the stages of one launch and the INFO line that must give each one's duration
STAGES = {
    "connection+forwards": r"SSH connection and local forwards ready in (\d+\.\d+)s",
    "total": r"remote pid \d+ \((?:ipc|tcp) transport\) ready in (\d+\.\d+)s",
    "agent": r"agent (\d+\.\d+)s",
    "spawn": r"spawn (\d+\.\d+)s",
    "sockets bound": r"sockets bound (\d+\.\d+)s",
}


def _message(session: str, code: str) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "username": "test",
            "session": session,
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True},
        "channel": "shell",
        "buffers": [],
    }


async def execute(server: JupyterServer, kernel_id: str, code: str) -> str:
    """Run ``code`` over the kernel's websocket, as a browser does; return its stdout."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    session = uuid.uuid4().hex
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={session}"
    request = HTTPRequest(url, headers={"Authorization": f"token {server.token}"})
    ws = await asyncio.wait_for(websocket_connect(request), 30)
    try:
        message = _message(session, code)
        await ws.write_message(json.dumps(message))
        out: list[str] = []
        replied = idle = False
        while not (replied and idle):  # shell and iopub arrive in either order
            raw = await asyncio.wait_for(ws.read_message(), 60)
            assert raw is not None, "the kernel websocket closed"
            reply = json.loads(raw)
            if reply["parent_header"].get("msg_id") != message["header"]["msg_id"]:
                continue
            if reply["msg_type"] == "stream" and reply["content"]["name"] == "stdout":
                out.append(reply["content"]["text"])
            elif reply["msg_type"] == "status":
                idle = reply["content"]["execution_state"] == "idle"
            elif reply["msg_type"] == "execute_reply":
                assert reply["content"]["status"] == "ok", reply["content"]
                replied = True
        return "".join(out)
    finally:
        ws.close()


async def test_server_log_shows_stages_and_no_secrets(
    tmp_path: Path, make_kernelspec, sshd, no_leftovers
) -> None:
    make_kernelspec(KERNEL)
    server = JupyterServer(tmp_path / "server", debug=True, config=LOGGING)
    await asyncio.to_thread(server.start)
    secrets: set[str] = set()
    try:
        kernel = await asyncio.to_thread(server.api, "POST", "/api/kernels", {"name": KERNEL})
        kernel_id = kernel["id"]
        connection_file = server.runtime_dir / f"kernel-{kernel_id}.json"
        secrets.add(connection_file.read_text())
        secrets.add(json.loads(connection_file.read_text())["key"])

        out = await execute(server, kernel_id, "import os; print(os.environ['SSH_CONNECTION'])")
        assert out.split()[2:] == ["127.0.0.1", str(sshd.port)]
        await asyncio.to_thread(server.api, "POST", f"/api/kernels/{kernel_id}/interrupt")
        await asyncio.to_thread(server.api, "POST", f"/api/kernels/{kernel_id}/restart")
        secrets.add(connection_file.read_text())
        secrets.add(json.loads(connection_file.read_text())["key"])
        assert (await execute(server, kernel_id, "print(6 * 7)")).strip() == "42"
        await asyncio.to_thread(server.api, "DELETE", f"/api/kernels/{kernel_id}")
    finally:
        returncode = await asyncio.to_thread(server.stop)
    assert returncode == 0
    no_leftovers()

    log = server.log_text()
    (artifacts_dir() / "jupyter-server-debug.log").write_text(log)
    assert "[D " in log and " sshpyk]" in log, "the log is not at DEBUG, or sshpyk's is missing"
    for secret in secrets:
        assert len(secret) >= 16
        assert secret not in log, f"a secret is in the server log: {secret[:40]!r}..."
    for key in {json.loads(s)["key"] for s in secrets if s.startswith("{")}:
        assert key.replace("-", "") not in log

    # Each launch (start, restart) logs every stage with its duration, at INFO, in the
    # server's own log (so it shows without --debug too).
    info = [line for line in log.splitlines() if line.startswith("[I ") and "ServerApp]" in line]
    launches = [line for line in info if kernel_id in line and re.search(STAGES["total"], line)]
    assert len(launches) == 2, "\n".join(line for line in info if kernel_id in line)
    for stage, pattern in STAGES.items():
        found = [float(m.group(1)) for line in info if (m := re.search(pattern, line))]
        assert len(found) == 2, f"stage {stage!r} is not logged with its duration at INFO"
    for line in launches:
        total, agent, spawn, bound = (
            float(re.search(STAGES[s], line).group(1))  # type: ignore[union-attr]
            for s in ("total", "agent", "spawn", "sockets bound")
        )
        assert agent + spawn + bound <= total + 0.005, line

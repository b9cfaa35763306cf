"""The issue's acceptance scenario: only AsyncKernelManager on a spec made by `sshpyk add`."""

from __future__ import annotations

import asyncio
import time

import pytest
from click.testing import CliRunner
from jupyter_client.manager import AsyncKernelManager

from sshpyk.cli import main
from sshpyk.kernelspec import load_spec, write_spec

from support.cli import add_args
from support.waiting import leftovers, wait_until


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_full_scenario(sshd, run_root) -> None:
    result = await asyncio.to_thread(  # the CLI runs its own event loop
        CliRunner().invoke, main, add_args(sshd, "ssh_scenario")
    )
    assert result.exit_code == 0, result.output
    spec = load_spec("ssh_scenario")
    spec.remote_run_root = str(run_root)  # count leftovers in a private place
    write_spec(spec, replace=True)

    km = AsyncKernelManager(kernel_name="ssh_scenario")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive("import os; pid = os.getpid()", timeout=30)
        assert reply["content"]["status"] == "ok"

        for _ in range(200):
            msg_id = kc.kernel_info()
            while True:
                msg = await kc.get_shell_msg(timeout=10)
                if msg["parent_header"]["msg_id"] == msg_id:
                    break

        size = 0

        def count(msg):
            nonlocal size
            if msg["msg_type"] == "stream":
                size += len(msg["content"]["text"])

        started = time.monotonic()
        reply = await kc.execute_interactive(
            "import sys\nfor _ in range(20):\n    sys.stdout.write('x' * 999_999 + '\\n')",
            output_hook=count,
            timeout=120,
        )
        assert reply["content"]["status"] == "ok"
        assert size == 20_000_000, size
        assert time.monotonic() - started < 60

        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        while True:
            msg = await kc.get_shell_msg(timeout=15)
            if msg["parent_header"]["msg_id"] == msg_id:
                break
        assert msg["content"]["ename"] == "KeyboardInterrupt"

        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive("pid", timeout=30)
        assert reply["content"]["ename"] == "NameError"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)

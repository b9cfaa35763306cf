"""JupyterLab in a real browser (Debian's chromium, driven by Playwright) on an SSH kernel.

The user's path: pick the SSH kernel in the launcher, run a cell, interrupt a
``time.sleep(60)`` with the toolbar's stop button, restart with the toolbar's restart
button, run again. A screenshot of the final page is left in the artifacts dir
($SSHPYK_ARTIFACTS, default tests/artifacts/).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.jupyter_server import JupyterServer, artifacts_dir

CHROMIUM = "/usr/bin/chromium"
#: Debian's chromium as root, on a closed network: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
SCREENSHOT = "jupyterlab-ssh-kernel.png"
KERNEL = "ssh_lab"
DISPLAY_NAME = "SSH test kernel (sshpyk-test)"
# Prints who ran it: host, the sshd session the kernel lives in, and the kernel's pid.
WHOAMI = """import os, socket
print("remote host:", socket.gethostname())
print("kernel pid:", os.getpid())
print("SSH_CONNECTION:", os.environ.get("SSH_CONNECTION"))"""
WHOAMI_RE = re.compile(r"remote host: (\S+)\s+kernel pid: (\d+)\s+SSH_CONNECTION: ([^\n]+)")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]


def _need_browser() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup does it)")
    for module in ("playwright.sync_api", "jupyterlab"):
        pytest.importorskip(module, reason=f"{module} is missing (pip install -e '.[clients]')")


@pytest.fixture
def lab(tmp_path: Path, make_kernelspec: Any) -> Iterator[JupyterServer]:
    _need_browser()
    make_kernelspec(KERNEL, display_name=DISPLAY_NAME)
    server = JupyterServer(tmp_path / "lab", app="jupyterlab").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(tmp_path: Path, lab: JupyterServer) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _wait_text(
    locator: Any,
    pattern: re.Pattern[str],
    timeout: float,
    accept: Callable[[re.Match[str]], bool] = lambda match: True,
) -> re.Match[str]:
    """Poll ``locator``'s text until ``pattern`` matches (and ``accept``s the match)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = locator.inner_text(timeout=5000) if locator.count() else ""
        match = pattern.search(text)
        if match and accept(match):
            return match
        time.sleep(0.1)
    raise AssertionError(f"{pattern.pattern!r} not seen within {timeout:g}s; text: {text!r}")


def _run_cell(page: Any, index: int, code: str | None = None) -> None:
    """Optionally type ``code`` into cell ``index``, then Shift+Enter it."""
    editor = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
    editor.click()
    if code is not None:
        page.keyboard.press("Control+A")
        page.keyboard.insert_text(code)  # no key events: no auto-closed brackets
    page.keyboard.press("Shift+Enter")


def _check_remote(match: re.Match[str], sshd_port: int, run_root: Path) -> int:
    host, pid, ssh_connection = match.group(1), int(match.group(2)), match.group(3).split()
    assert host == socket.gethostname()
    # sshd sets SSH_CONNECTION = client ip, client port, server ip, server port
    assert ssh_connection[2:] == ["127.0.0.1", str(sshd_port)], ssh_connection
    # that pid is the kernel sshpyk's agent started, with its files in the run root
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert str(run_root) in cmdline, cmdline
    return pid


def test_jupyterlab_notebook_on_ssh_kernel(
    lab: JupyterServer, page: Any, sshd: Any, run_root: Path, no_leftovers: Any
) -> None:
    for stale in ("jupyterlab-failure.png", "jupyterlab-failure.log", SCREENSHOT):
        (artifacts_dir() / stale).unlink(missing_ok=True)
    try:
        page.goto(f"{lab.base_url}/lab?token={lab.token}")
        card = page.locator(f'.jp-LauncherCard[data-category="Notebook"][title="{DISPLAY_NAME}"]')
        card.click(timeout=60_000)  # the SSH kernelspec is in the launcher
        toolbar = page.locator(".jp-NotebookPanel-toolbar")
        idle = toolbar.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        # The notebook's kernel is the SSH one, started and idle ("No Kernel" at first).
        _wait_text(toolbar.locator(".jp-KernelName"), re.compile(re.escape(DISPLAY_NAME)), 60)
        status_bar = page.locator(".jp-StatusBar-TextItem", has_text=DISPLAY_NAME)
        _wait_text(status_bar, re.compile(re.escape(f"{DISPLAY_NAME} | Idle")), 90)
        idle.wait_for(timeout=10_000)
        kernels = lab.api("GET", "/api/kernels")
        assert [k["name"] for k in kernels] == [KERNEL]

        cells = page.locator(".jp-Notebook .jp-Cell")
        _run_cell(page, 0, WHOAMI)
        first = _wait_text(cells.nth(0).locator(".jp-OutputArea"), WHOAMI_RE, 30)
        first_pid = _check_remote(first, sshd.port, run_root)

        # Interrupt a long sleep with the toolbar's stop button.
        _run_cell(page, 1, 'import time\nprint("sleeping", flush=True)\ntime.sleep(60)')
        _wait_text(cells.nth(1).locator(".jp-OutputArea"), re.compile("sleeping"), 30)
        page.wait_for_timeout(300)  # the sleep has begun
        started = time.monotonic()
        toolbar.locator('[data-command="notebook:interrupt-kernel"]').click()
        _wait_text(cells.nth(1).locator(".jp-OutputArea"), re.compile("KeyboardInterrupt"), 20)
        assert time.monotonic() - started < 10
        idle.wait_for(timeout=20_000)

        # Restart with the toolbar's button and its confirmation dialog.
        toolbar.locator('[data-command="notebook:restart-kernel"]').click()
        dialog = page.locator(".jp-Dialog")
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click(timeout=10_000)
        dialog.wait_for(state="detached", timeout=10_000)
        idle.wait_for(timeout=60_000)

        # Run the first cell again: a new remote process, the same SSH server.
        _run_cell(page, 0)
        again = _wait_text(
            cells.nth(0).locator(".jp-OutputArea"),
            WHOAMI_RE,
            60,
            accept=lambda match: int(match.group(2)) != first_pid,
        )
        second_pid = _check_remote(again, sshd.port, run_root)
        assert second_pid != first_pid
        assert cells.nth(0).locator(".jp-InputPrompt").inner_text().strip() == "[1]:"
        idle.wait_for(timeout=20_000)
        page.locator(".jp-Notebook").click(position={"x": 5, "y": 5})  # park the cursor
        shot = artifacts_dir() / SCREENSHOT
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
    except BaseException:
        page.screenshot(path=str(artifacts_dir() / "jupyterlab-failure.png"))
        (artifacts_dir() / "jupyterlab-failure.log").write_text(lab.log_text())
        raise
    assert lab.stop() == 0  # the server shuts the SSH kernel down as it exits
    no_leftovers()

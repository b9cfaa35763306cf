"""Errors as users see them: one line, and the one a failed connect raises."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import sshpyk
from sshpyk import SSHSession


def one_line(exc: BaseException) -> str:
    """The error's message, which must be one line and not empty."""
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


async def connect_error(
    alias: str, config: Path, *, connect_timeout: float = 10.0, within: float = 5.0
) -> BaseException:
    """The one-line SSHPykError that connecting to ``alias`` raises within ``within`` s."""
    started = time.monotonic()
    with pytest.raises(sshpyk.SSHPykError) as info:
        async with await SSHSession.connect(
            alias, ssh_config=config, connect_timeout=connect_timeout
        ):
            pass
    assert time.monotonic() - started < within
    one_line(info.value)
    return info.value

"""Logins that need a person: passwords, keyboard-interactive codes, key passphrases.

OpenSSH's conventions (ssh(1), readpass.c): a prompt goes to the controlling terminal
(``/dev/tty``) when there is one; otherwise to the program named by ``SSH_ASKPASS`` when
``DISPLAY`` (or ``WAYLAND_DISPLAY``) is set. ``SSH_ASKPASS_REQUIRE`` changes that:
``prefer`` uses askpass even with a terminal (when a display is set), ``force`` uses it
whatever the terminal and display, ``never`` never uses it. With neither, the login
fails at once with a one-line error that names SSH_ASKPASS and ``sshpyk check``.
``BatchMode yes`` in the ssh config means never prompt. The number of tries per method
is ``NumberOfPasswordPrompts`` (default 3).

A :class:`LoginPrompter` belongs to one connection attempt (kernels and bastions share
pool connections, so one prompt serves all of them; a reconnect asks again). Answers
live only in memory on their way to asyncssh: never logged, never in argv, environment
or files.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import subprocess
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh

from ..errors import BatchModeError, LoginPromptError

__all__ = [
    "ASKPASS_TIMEOUT",
    "DEFAULT_TRIES",
    "LoginPrompter",
    "PromptSettings",
    "PromptingClient",
    "prompt_settings",
]

log = logging.getLogger("sshpyk")

#: ssh's default NumberOfPasswordPrompts.
DEFAULT_TRIES = 3

#: Bound on one askpass program run (a person answers it).
ASKPASS_TIMEOUT = 300.0

#: Longest answer read from the terminal (bytes).
_MAX_ANSWER = 4096

#: Bound on ``ssh -G`` (reads BatchMode and NumberOfPasswordPrompts as OpenSSH does).
_SSH_G_TIMEOUT = 5.0


@dataclass(frozen=True)
class PromptSettings:
    batch_mode: bool = False
    tries: int = DEFAULT_TRIES


def prompt_settings(host: str, ssh_config: str | None) -> PromptSettings:
    """BatchMode and NumberOfPasswordPrompts for ``host`` as OpenSSH reads them
    (``ssh -G``; asyncssh does not parse these); defaults if ssh cannot tell."""
    argv = ["ssh", "-G", *(["-F", ssh_config] if ssh_config else []), "--", host]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=_SSH_G_TIMEOUT, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return PromptSettings()
    batch, tries = False, DEFAULT_TRIES
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "batchmode":
            batch = value.strip() == "yes"
        elif key == "numberofpasswordprompts" and value.strip().isdigit():
            tries = int(value.strip())
    return PromptSettings(batch, tries)


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _channel() -> str | None:
    """ "tty", "askpass" or None (nobody can be asked), as ssh(1) chooses."""
    askpass = os.environ.get("SSH_ASKPASS") or None
    require = os.environ.get("SSH_ASKPASS_REQUIRE", "").lower()
    display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    tty = _has_terminal()
    if require == "never":
        askpass = None
    if askpass and require == "force":
        return "askpass"
    if askpass and display and (require == "prefer" or not tty):
        return "askpass"
    return "tty" if tty else None


def _ask_tty(prompt: str, echo: bool) -> str | None:
    """Ask on /dev/tty; without echo when ``echo`` is false (bounded line length)."""
    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    try:
        old = termios.tcgetattr(fd)
        if not echo:
            new = termios.tcgetattr(fd)
            new[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        line = bytearray()
        try:
            os.write(fd, prompt.encode("utf-8", "replace"))
            while len(line) < _MAX_ANSWER and not line.endswith(b"\n"):
                chunk = os.read(fd, 1024)
                if not chunk:
                    break
                line += chunk
        finally:
            if not echo:
                termios.tcsetattr(fd, termios.TCSAFLUSH, old)
                os.write(fd, b"\n")
    finally:
        os.close(fd)
    if not line.endswith(b"\n"):
        return None  # end of input: nobody answered
    return line.decode("utf-8", "replace").rstrip("\r\n")


def _ask_askpass(prompt: str, echo: bool) -> str | None:
    program = os.environ["SSH_ASKPASS"]
    env = dict(os.environ)
    env.pop("SSH_ASKPASS_PROMPT", None)
    try:
        done = subprocess.run(
            [program, prompt],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            timeout=ASKPASS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", "replace").rstrip("\r\n")


#: ``ask(what, prompt, echo) -> answer or None``, called from a worker thread: who asks
#: the person instead of this process's terminal or askpass (the connection broker sets
#: it for the logins it makes: the question goes to the client process that waits).
Asker = Callable[[str, str, bool], "str | None"]
RELAYED_ASKER: contextvars.ContextVar[Asker | None] = contextvars.ContextVar(
    "sshpyk_relayed_asker", default=None
)


def ask_here(prompt: str, echo: bool) -> tuple[str | None, str | None]:
    """Ask this process's person (terminal or askpass, as ssh(1) chooses): (answer or
    None, the channel or None when there is nobody to ask)."""
    channel = _channel()
    if channel is None:
        return None, None
    try:
        answer = (_ask_tty if channel == "tty" else _ask_askpass)(prompt, echo)
    except OSError:
        answer = None
    return answer, channel


#: the one-line reason when there is nobody to ask
NOBODY_TO_ASK = (
    "the server asks for a {what}, but there is no terminal to ask on and no "
    "SSH_ASKPASS program (set SSH_ASKPASS, with DISPLAY or SSH_ASKPASS_REQUIRE=force, "
    "or use a key); `sshpyk check {alias}` shows the methods the server offers"
)


@dataclass
class LoginPrompter:
    """Asks a person for what one connection's login needs, within bounds.

    ``label`` names the host in prompts and errors (a bastion is named as one);
    ``failure`` is the one-line reason when the login could not be answered.
    """

    label: str
    alias: str
    #: read when a prompt is due (BatchMode, NumberOfPasswordPrompts)
    settings: Callable[[], PromptSettings] = PromptSettings
    reconnect: bool = False
    failure: str | None = None
    #: the class of the error ``failure`` makes
    error: type[LoginPromptError] = LoginPromptError
    tries: dict[str, int] = field(default_factory=dict)
    #: asks instead of this process (RELAYED_ASKER where the prompter is made)
    asker: Asker | None = field(default_factory=RELAYED_ASKER.get)

    def _fail(self, text: str, error: type[LoginPromptError] = LoginPromptError) -> None:
        self.failure = f"authentication failed for {self.label}: {text}"
        self.error = error

    def _may_ask(self, what: str) -> str | None:
        """The channel to ask on for ``what``, or None (and ``failure`` says why)."""
        settings = self.settings()
        if settings.batch_mode:
            self._fail(
                f"the server asks for a {what} and BatchMode yes forbids prompting",
                BatchModeError,
            )
            return None
        used = self.tries.get(what, 0)
        if used >= settings.tries:
            self._fail(
                f"{what} not accepted after {used} tries (NumberOfPasswordPrompts {settings.tries})"
            )
            return None
        channel = "process that connects" if self.asker is not None else _channel()
        if channel is None:
            self._fail(NOBODY_TO_ASK.format(what=what, alias=self.alias))
            return None
        self.tries[what] = used + 1
        why = " (the connection is being reopened)" if self.reconnect else ""
        log.info("[%s] asking for a %s on the %s%s", self.alias, what, channel, why)
        return channel

    def ask_sync(self, what: str, prompt: str, echo: bool = False) -> str | None:
        channel = self._may_ask(what)
        if channel is None:
            return None
        if self.asker is not None:
            answer = self.asker(what, prompt, echo)
        else:
            answer, _ = ask_here(prompt, echo)
        if answer is None:
            self._fail(f"no answer to the {what} prompt ({channel})")
        return answer

    async def ask(self, what: str, prompt: str, echo: bool = False) -> str | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.ask_sync, what, prompt, echo)

    def passphrase(self, filename: str) -> str | None:
        """asyncssh's passphrase callback: asks until the key decrypts (bounded)."""
        try:
            with open(filename, "rb") as f:
                data = f.read()
        except OSError:
            return None
        while True:
            answer = self.ask_sync(
                "key passphrase", f"Enter passphrase for key '{filename}' ({self.label}): "
            )
            if answer is None:
                return None
            try:
                asyncssh.import_private_key(data, answer)
                return answer
            except (asyncssh.KeyImportError, ValueError) as exc:
                if "bcrypt" in str(exc):  # asyncssh cannot decrypt this format here
                    self._fail(
                        f"cannot decrypt key {filename}: {' '.join(str(exc).split())} "
                        "(pip install bcrypt, or load the key into ssh-agent)"
                    )
                    return None
                log.info("[%s] wrong passphrase for %s", self.alias, filename)


class PromptingClient(asyncssh.SSHClient):
    """The asyncssh client half that answers password and keyboard-interactive logins
    through :attr:`prompter`, and notes which methods the server offered and which
    were used (``sshpyk check``)."""

    prompter: LoginPrompter | None = None

    def __init__(self) -> None:
        self.auth_offered: list[str] = []
        self.auth_tried: list[str] = []
        self._conn: asyncssh.SSHClientConnection | None = None
        self._kbdint_rounds = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        # asyncssh asks the client object about keys only when its own list is used
        # up: note each public key try on the connection's side instead
        keys = getattr(conn, "public_key_auth_requested", None)
        if callable(keys):

            async def noted() -> object:
                self._note("publickey")
                return await keys()

            setattr(conn, "public_key_auth_requested", noted)  # noqa: B010
        # GSSAPI (sshpyk.ssh.kerberos) is decided on the connection's side too: asyncssh
        # asks itself whether to try each method the server offers
        for hook_name, method in (
            ("gss_kex_auth_requested", "gssapi-keyex"),
            ("gss_mic_auth_requested", "gssapi-with-mic"),
        ):
            hook = getattr(conn, hook_name, None)
            if callable(hook):
                setattr(conn, hook_name, self._noting(hook, method))

    def _noting(self, hook: Callable[[], bool], method: str) -> Callable[[], bool]:
        def noted() -> bool:
            tried = hook()
            self._note(method, tried=bool(tried))
            return tried

        return noted

    def _note(self, method: str, *, tried: bool = True) -> None:
        if self._conn is not None:
            for offered in self._conn.get_server_auth_methods():
                if offered not in self.auth_offered and offered != "none":
                    self.auth_offered.append(offered)
        if method not in self.auth_offered:
            self.auth_offered.append(method)
        if tried and method not in self.auth_tried:
            self.auth_tried.append(method)

    @property
    def gss_principal(self) -> str | None:
        """The Kerberos principal a GSSAPI login used, once it succeeded."""
        if self._conn is None or not any(m.startswith("gssapi") for m in self.auth_tried):
            return None
        try:
            return self._conn.get_gss_context().user
        except (AssertionError, AttributeError, ValueError):
            return None

    async def password_auth_requested(self) -> str | None:  # type: ignore[override]
        self._note("password")
        if self.prompter is None:
            return None
        return await self.prompter.ask("password", f"{self.prompter.label} password: ")

    def kbdint_auth_requested(self) -> str | None:
        self._note("keyboard-interactive")
        return None if self.prompter is None else ""

    async def kbdint_challenge_received(  # type: ignore[override]
        self, name: str, instructions: str, lang: str, prompts: list[tuple[str, bool]]
    ) -> list[str] | None:
        if self.prompter is None:
            return None
        if not prompts:
            return []
        self._kbdint_rounds += 1
        header = " ".join(f"{name} {instructions}".split())
        answers: list[str] = []
        for i, (text, echo) in enumerate(prompts):
            shown = f"({self.prompter.label}) {text}"
            if header and i == 0:
                shown = f"{header} {shown}"
            # every prompt of one round counts as one try of the round
            what = "keyboard-interactive answer"
            if i > 0:
                self.prompter.tries[what] = self.prompter.tries.get(what, 1) - 1
            answer = await self.prompter.ask(what, shown, echo)
            if answer is None:
                return None
            answers.append(answer)
        return answers

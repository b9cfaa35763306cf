"""Logins that need a person, through the connection broker: asked in the client process.

The broker has no terminal and runs no askpass program. When it logs in to a host for
its clients and the host asks a question (a password, a one-time code, a key
passphrase, also for a ProxyJump bastion), the question goes to a client process that
waits for that login, as an SSH keyboard-interactive round on the client's own
connection to the broker; the client asks its person (its terminal or SSH_ASKPASS, as
ssh(1) does) and answers. So a login is asked once, in a process that triggered it,
for every process that waits for it; a reconnect after a drop asks once for all.

* :class:`LoginRelay` (the broker's side, one per upstream host): the current question
  and the clients waiting for the login. A question goes to the first of them; if that
  client leaves before it answers, to the next; with nobody left, it has no answer
  (the login fails and says so).
* :class:`RelayedLoginClient` (the client's side): answers the broker's rounds by
  asking here. BatchMode and NumberOfPasswordPrompts are the broker's (it reads the
  same ssh config); whether there is anyone to ask is this process's.

Answers live in memory only, for the time of the login; none is logged or written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from .prompt import NOBODY_TO_ASK, ask_here

__all__ = ["QUESTION_TIMEOUT", "LoginRelay", "Question", "RelayedLoginClient"]

log = logging.getLogger("sshpyk")

#: seconds a question waits for its answer (a person typing, an askpass dialog)
QUESTION_TIMEOUT = 300.0


@dataclass
class Question:
    what: str
    prompt: str
    echo: bool
    answer: asyncio.Future[str | None] = field(repr=False)
    #: the client it is asked of (None: not yet, or that client left)
    asked_of: object | None = None


class LoginRelay:
    """The questions of one host's login and the clients that may answer them."""

    def __init__(self) -> None:
        self.waiting: list[object] = []
        self.question: Question | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def join(self, who: object) -> None:
        if who not in self.waiting:
            self.waiting.append(who)

    def leave(self, who: object) -> None:
        """``who`` waits no more (it left, or its login finished)."""
        if who in self.waiting:
            self.waiting.remove(who)
        question = self.question
        if question is not None and question.asked_of is who:
            question.asked_of = None
            if not self.waiting and not question.answer.done():
                question.answer.set_result(None)  # nobody left to ask
        self._notify()

    async def ask(self, what: str, prompt: str, echo: bool) -> str | None:
        """The answer of a waiting client's person, or None (nobody, or no answer)."""
        if not self.waiting:
            return None
        question = Question(what, prompt, echo, asyncio.get_running_loop().create_future())
        self.question = question
        self._notify()
        try:
            return await asyncio.wait_for(asyncio.shield(question.answer), QUESTION_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        finally:
            self.question = None
            self._notify()

    def answer(self, who: object, text: str | None) -> None:
        question = self.question
        if question is not None and question.asked_of is who and not question.answer.done():
            question.answer.set_result(text)

    async def next_for(self, who: object, login: asyncio.Future[Any]) -> Question | None:
        """The question ``who`` is to answer now, or None once ``login`` is over."""
        for _ in range(10_000):  # each round waits for a change: bounded by the login
            question = self.question
            if login.done():
                return None
            if question is not None and not question.answer.done():
                if question.asked_of is None and self.waiting and self.waiting[0] is who:
                    question.asked_of = who
                if question.asked_of is who:
                    return question
            changed: asyncio.Future[Any] = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, login}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        return None

    def asker(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, str, bool], str | None]:
        """:data:`~sshpyk.ssh.prompt.RELAYED_ASKER` for the login: called in a worker
        thread, it waits for the answer on ``loop``."""

        def ask(what: str, prompt: str, echo: bool) -> str | None:
            future = asyncio.run_coroutine_threadsafe(self.ask(what, prompt, echo), loop)
            try:
                return future.result(QUESTION_TIMEOUT + 5)
            except Exception:  # the loop is closing, or no answer in time
                future.cancel()
                return None

        return ask


class RelayedLoginClient(asyncssh.SSHClient):
    """A client process's end of the broker's keyboard-interactive rounds."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        #: why this process could not answer (its one-line reason), if so
        self.failure: str | None = None

    def kbdint_auth_requested(self) -> str | None:
        return ""

    async def kbdint_challenge_received(  # type: ignore[override]
        self, name: str, instructions: str, lang: str, prompts: list[tuple[str, bool]]
    ) -> list[str] | None:
        loop = asyncio.get_running_loop()
        answers: list[str] = []
        for prompt, echo in prompts:
            answer, channel = await loop.run_in_executor(None, ask_here, prompt, echo)
            if channel is None:
                self.failure = NOBODY_TO_ASK.format(what="password or code", alias=self.alias)
            if answer is None:
                return None
            log.info("[%s] answered the login's question on the %s", self.alias, channel)
            answers.append(answer)
        return answers

"""Owners and controllers: the local processes whose kernels an agent runs, each with its
own grace, and the channels they talk to the agent by.

Several local processes may share one agent (through the connection broker: two
VS Code launchers, a Jupyter server and ``sshpyk ps``). Each says who it is with a
random token: in the stdio hello, or with ``claim`` as the first message on the
control socket (a reattach, or a process joining the agent). A kernel belongs to the
owner whose controller launched it. What one owner does never decides for another:

* its messages are contact for itself only;
* ``shutdown`` stops its own kernels only;
* its grace runs when none of its controllers is attached: ``link_grace`` after it
  went away without a word (a reset, a silent link, a killed process that ran its own
  connection, a dropped connection broker: they look the same from here), the short
  ``grace`` once it is known to be gone: ``gone`` from a surviving local party (the
  connection broker's last will for a process that exited);
* a controller that never claims (a ``ps`` probe, a will's delivery) is nobody.
"""

import os
import socket
import sys
import threading
import time

from .jsonlines import read_messages, stdout_writer

#: the owner of kernels launched by a controller that did not say who it is
NOBODY = ""


class Owner:
    """One local process, as the agent knows it."""

    def __init__(self, token):
        self.token = token
        self.controllers = set()
        self.last_contact = time.monotonic()
        #: known gone (short grace), not merely unheard (link grace)
        self.gone = False
        #: a will said it exited while a controller of its was still attached: the will
        #: and the controller's EOF come by different channels, in either order
        self.said_gone = False
        #: its kernels were stopped (grace over, or it left on purpose)
        self.detached = False

    def heard(self):
        self.last_contact = time.monotonic()
        self.gone = False
        self.detached = False


class Owners:
    """The owners of one agent and the grace of each."""

    def __init__(self, grace, link_grace):
        self.grace = grace
        self.link_grace = max(grace, link_grace)
        self.by_token = {}

    def of(self, token):
        token = str(token or NOBODY)
        owner = self.by_token.get(token)
        if owner is None:
            owner = self.by_token[token] = Owner(token)
        return owner

    def claim(self, controller, token):
        """``controller`` speaks for ``token`` from now on (it is contact)."""
        old = getattr(controller, "owner", None)
        if old is not None:
            old.controllers.discard(controller)
        owner = self.of(token)
        controller.owner = owner
        owner.controllers.add(controller)
        owner.said_gone = False  # a new controller speaks for it: it is alive
        owner.heard()
        return owner

    def heard(self, controller):
        owner = getattr(controller, "owner", None)
        if owner is not None:
            owner.heard()

    def left(self, controller):
        """``controller`` ended: its owner's link grace runs once none is left. An end
        says nothing of why, whatever channel it came by: sshd closes the session alike
        for a reset link and for a process that died, so only a ``gone`` from a
        surviving party shortens the grace."""
        owner = getattr(controller, "owner", None)
        if owner is not None:
            owner.controllers.discard(controller)
            if owner.said_gone and not owner.controllers:
                owner.gone = True

    def said_gone(self, token):
        """A surviving local party says the process ``token`` exited. While one of its
        controllers is still attached the word waits for that controller's end (the
        will may overtake the EOF of the dead process's channel); a claim for the token
        (a controller that speaks for a live process) voids it."""
        owner = self.by_token.get(str(token or NOBODY))
        if owner is None:
            return
        if owner.controllers:
            owner.said_gone = True
        else:
            owner.gone = True

    def expired(self, now):
        """Owners whose grace is over now (their kernels are to be stopped)."""
        if not self.grace:
            return []
        over = []
        for owner in list(self.by_token.values()):
            if owner.controllers or owner.detached:
                continue
            limit = self.grace if owner.gone else self.link_grace
            if now - owner.last_contact > limit:
                over.append(owner)
        return over

    def others_attached(self, owner):
        """Controllers of other owners are attached (the agent has users besides ``owner``)."""
        return any(o.controllers for o in self.by_token.values() if o is not owner)

    def last_contact(self):
        return max((o.last_contact for o in self.by_token.values()), default=time.monotonic())

    def all_detached(self, tokens):
        return all(self.of(t).detached for t in tokens)

    def any_active(self):
        """Some owner is attached or within its grace (spares are worth keeping warm)."""
        return any(not o.detached for o in self.by_token.values())


class Controller:
    """A local side talking to the agent: the SSH channel's stdio, or a reattached socket.
    Its reader thread posts ``("msg", (controller, dict))`` and, at EOF, ``("eof", c)``."""

    def __init__(self, agent, reader, writer, closer):
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.closer = closer
        self.heard = False  # has it sent a message yet (see Agent.attach)
        self.owner = None  # the owners.Owner it speaks for (hello or claim)

    def start(self):
        threading.Thread(target=self._read, name="controller", daemon=True).start()

    def _read(self):
        read_messages(self.reader, lambda msg: self.agent.events.put(("msg", (self, msg))))
        self.agent.events.put(("eof", self))

    def close(self):
        try:
            self.closer()
        except OSError:
            pass


def stdio_controller(agent):
    def close():
        try:
            os.close(1)
        except OSError:
            pass

    return Controller(agent, sys.stdin.buffer, stdout_writer, close)


def socket_controller(agent, conn):
    rfile = conn.makefile("rb")

    def close():
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        rfile.close()  # the file holds a reference: the fd stays open until both close
        conn.close()

    return Controller(agent, rfile, conn.sendall, close)

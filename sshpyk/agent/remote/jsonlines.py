"""JSON lines, the one reader and writer: requests in, events out, and the node's
control lines over srun's stdio."""

import json
import sys
import threading

from .protocol import PROTOCOL


def encode(message):
    """One line: the JSON of ``message`` and a newline, UTF-8."""
    return (json.dumps(message) + "\n").encode("utf-8")


def decode(line):
    """The dict a line holds, or None (not JSON, or not an object)."""
    try:
        message = json.loads(line.decode("utf-8"))
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def read_messages(stream, deliver):
    """Call ``deliver(dict)`` for every JSON object line of the binary ``stream`` until
    its EOF (or a read error); other lines are skipped."""
    while True:  # ends at EOF
        try:
            line = stream.readline()
        except (OSError, ValueError):
            return
        if not line:
            return
        message = decode(line)
        if message is not None:
            deliver(message)


def stdout_writer(data):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


class Output:
    """Where events go: every writer attached (a controller's socket or stdout); thread
    safe (worker threads emit too)."""

    def __init__(self, writers=None):
        self.lock = threading.Lock()
        self.writers = list(writers or [])

    def add(self, writer):
        with self.lock:
            self.writers.append(writer)

    def remove(self, writer):
        with self.lock:
            if writer in self.writers:
                self.writers.remove(writer)

    def send(self, data, only=None):
        with self.lock:
            for write in [only] if only else list(self.writers):
                try:
                    write(data)
                except (OSError, ValueError):
                    pass  # that controller is gone; its reader notices

    def emit(self, event, _only=None, **fields):
        """Send the event ``event`` with ``fields`` (and the protocol version)."""
        fields["v"] = PROTOCOL
        fields["event"] = event
        self.send(encode(fields), _only)


def stdout_output():
    """An Output to this process's stdout (the node side, errors before the agent runs)."""
    return Output([stdout_writer])

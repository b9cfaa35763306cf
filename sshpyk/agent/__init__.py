"""The agent layer: the local side of the remote agent (what is sent, how it is talked
to); ``remote/`` holds the agent's own modules."""

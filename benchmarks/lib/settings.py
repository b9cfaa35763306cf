"""What a run measures and how often: :class:`Settings`, per RTT, and the sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["DEFAULT_RTTS", "DEFAULT_SECTIONS", "RTT_SECTIONS", "SECTIONS", "Settings"]

SECTIONS = ("lifecycle", "latency", "reconnect", "spare", "tunnel", "idle", "concurrent")
#: run at every RTT; the others only on loopback (RTT 0) and only when asked for
RTT_SECTIONS = ("lifecycle", "latency", "reconnect", "spare")
DEFAULT_SECTIONS = RTT_SECTIONS
DEFAULT_RTTS = (0, 20, 100)


@dataclass
class Settings:
    reps: int = 5  # lifecycle driver processes per candidate (one cold start each)
    cycles: int = 1  # warm start / restart / shutdown cycles per lifecycle process
    rounds: int = 200  # kernel_info round trips
    print_bytes: int = 20_000_000
    print_reps: int = 3
    tunnel_bytes: int = 200 * 2**20
    tunnel_ciphers: list[tuple[str | None, int]] = field(
        default_factory=lambda: [
            (None, 3),
            ("aes128-gcm@openssh.com", 3),
            ("aes256-gcm@openssh.com", 3),
            ("chacha20-poly1305@openssh.com", 3),
            ("aes128-ctr", 3),
        ]
    )
    idle_kernels: int = 8
    idle_seconds: float = 60.0
    concurrent: int = 32
    timeout: float = 120.0  # per kernel operation
    driver_timeout: float = 600.0  # per driver process
    reconnect_reps: int = 3  # reconnect driver processes per SSH candidate
    reconnect_down: float = 1.0  # seconds the link stays down (reset, then refused)
    reconnect_limit: float = 40.0  # after the reset: no reply by then is "did not reconnect"
    #: the RTT (ms) these settings are for; :meth:`at` makes the per-RTT ones
    rtt: int = 0
    driver_log_level: str = "WARNING"  # the drivers' jupyter_client and sshpyk loggers
    quick_run: bool = False
    #: sshpyk's connection_persist ($SSHPYK_SHARE_PERSIST): 0, each driver logs in itself;
    #: > 0, through a connection broker (a private one per run, stopped after each driver)
    share_persist: float = 0.0
    fixed_reps: bool = False  # --reps given: the same at every RTT

    def at(self, rtt: int) -> Settings:
        """These settings for one RTT: fewer repetitions on slow links, so that the whole
        default run (0, 20 and 100 ms) stays within about 15 minutes on 2 cores."""
        s = dataclasses.replace(self, rtt=rtt)
        if rtt > 0:
            if not s.fixed_reps:
                s.reps = min(s.reps, 2 if s.quick_run else 3)
            s.rounds = min(s.rounds, 50 if rtt >= 50 else 100)
            s.print_reps = min(s.print_reps, 2)
        return s

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            quick_run=True,
            reconnect_reps=1,
            reps=2,
            cycles=1,
            rounds=100,
            print_bytes=5_000_000,
            print_reps=1,
            tunnel_bytes=50 * 2**20,
            tunnel_ciphers=[(None, 1), ("aes128-gcm@openssh.com", 1)],
            idle_kernels=4,
            idle_seconds=15.0,
            concurrent=8,
            timeout=90.0,
            driver_timeout=300.0,
        )

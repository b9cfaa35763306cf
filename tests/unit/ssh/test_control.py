"""The connection broker's slots: single-flight, waiters, abandon and stale values."""

from __future__ import annotations

import asyncio

import pytest

from sshpyk.ssh.control import Slots


async def test_one_claimer_fills_the_others_wait_for_its_value() -> None:
    slots = Slots()
    a, b, c = object(), object(), object()
    assert await slots.claim("k", a, 5) == (False, None)  # a fills
    waiting = [asyncio.ensure_future(slots.claim("k", who, 5)) for who in (b, c)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting)
    slots.put("k", {"socket": "/s", "pid": 7}, a)
    assert await asyncio.gather(*waiting) == [(True, {"socket": "/s", "pid": 7})] * 2
    assert await slots.claim("k", c, 0) == (True, {"socket": "/s", "pid": 7})


async def test_an_abandoned_or_closed_filler_hands_over_to_the_next() -> None:
    slots = Slots()
    a, b, c = object(), object(), object()
    assert await slots.claim("k", a, 5) == (False, None)
    second = asyncio.ensure_future(slots.claim("k", b, 5))
    await asyncio.sleep(0.05)
    slots.abandon("k", a)
    assert await second == (False, None)  # b fills now
    third = asyncio.ensure_future(slots.claim("k", c, 5))
    await asyncio.sleep(0.05)
    slots.gone(b)  # b's channel closed while it filled
    assert await third == (False, None)
    slots.abandon("k", a)  # not the filler any more: nothing happens
    assert slots.fillers == {"k": c}


async def test_a_stale_value_is_dropped_only_if_it_is_still_there() -> None:
    slots = Slots()
    a = object()
    slots.put("k", {"pid": 1}, a)
    slots.drop("k", {"pid": 2})  # someone else's view: not the value there
    assert slots.values == {"k": {"pid": 1}}
    slots.drop("k", {"pid": 1})
    assert slots.values == {} and await slots.claim("k", a, 1) == (False, None)


async def test_a_claim_waits_no_longer_than_asked() -> None:
    slots = Slots()
    assert await slots.claim("k", object(), 5) == (False, None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await slots.claim("k", object(), 0.2)
    assert loop.time() - started < 1.0

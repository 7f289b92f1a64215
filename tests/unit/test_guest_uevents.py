"""The agent's device-event wake-up: it ends at a kernel uevent, and only then before its timeout."""

from __future__ import annotations

import asyncio
import time

from netns_helpers import in_netns, needs_netns, netns, sh

from kabuto.guest.uevents import DeviceEvents

pytestmark = needs_netns


async def test_a_device_event_ends_the_wait_early():
    with netns() as name:
        events = in_netns(name, DeviceEvents)  # its socket hears the devices of that netns
        with events:
            assert events.listening
            sh("ip", "-n", name, "link", "add", "kbt-a0", "type", "veth", "peer", "name", "kbt-b0")
            started = time.monotonic()
            assert await events.wait(20.0)
            assert time.monotonic() - started < 10.0


async def test_without_an_event_the_wait_ends_at_its_timeout():
    with netns() as name:
        with in_netns(name, DeviceEvents) as events:
            started = time.monotonic()
            assert not await events.wait(0.3)
            assert 0.25 < time.monotonic() - started < 5.0


async def test_queued_events_are_consumed_by_one_wake_up():
    with netns() as name:
        with in_netns(name, DeviceEvents) as events:
            for index in range(3):
                sh("ip", "-n", name, "link", "add", f"kbt-a{index}", "type", "veth",
                   "peer", "name", f"kbt-b{index}")
            await asyncio.sleep(0.2)
            assert await events.wait(5.0)
            assert not await events.wait(0.3)


def test_closed_events_only_sleep():
    events = DeviceEvents()
    events.close()
    assert not events.listening
    assert not asyncio.run(events.wait(0.01))


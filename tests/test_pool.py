"""The shared scheduler with real whisper.cpp contexts: finals first, partials coalesced."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench import corpus
from bench.drive import wait_for
from bridge.recognizer.engines import DecodeOptions
from bridge.recognizer.pool import Priority, RecognizerPool, Superseded


@pytest.fixture(scope="module")
def single(model_path):
    p = RecognizerPool(model_path, size=1, threads=1, partial_max_wait_s=30)
    p.start()
    yield p
    p.close()


async def test_finals_overtake_queued_partials(single):
    speech = corpus.synthesize("Please hold while I look up your account information.")
    done: list[str] = []

    async def job(name, prio, key=None):
        await single.decode(speech, DecodeOptions(partial=prio == Priority.PARTIAL), prio, key=key)
        done.append(name)

    # a full 30 s window keeps the only context busy while the others queue (0.3 s or more)
    first = asyncio.create_task(single.decode(speech, DecodeOptions(offline=True), Priority.FINAL))
    first.add_done_callback(lambda _: done.append("busy"))
    assert await wait_for(lambda: single.busy == 1, timeout=10), "the busy decode never started"
    tasks = [asyncio.create_task(job(f"p{i}", Priority.PARTIAL, key=i)) for i in range(3)]
    assert await wait_for(lambda: single.queue_depth()["partial"] == 3, timeout=10), single.queue_depth()
    depth = single.queue_depth()
    tasks.append(asyncio.create_task(job("final", Priority.FINAL)))
    assert await wait_for(lambda: single.queue_depth()["final"] == 1, timeout=10), single.queue_depth()
    assert not first.done(), "the busy decode ended before the final was queued: nothing was overtaken"
    await asyncio.gather(first, *tasks)
    assert depth["partial"] == 3
    assert done[0] == "busy" and done[1] == "final", done
    st = single.stats()
    assert st["completed"]["final"] >= 2 and st["completed"]["partial"] >= 3
    assert st["decode_seconds"]["final"]["count"] >= 2


async def test_newer_partial_of_a_leg_supersedes_the_queued_one(single):
    speech = corpus.synthesize("My card was charged twice for the same purchase last week.")
    busy = asyncio.create_task(single.decode(speech, DecodeOptions(offline=True), Priority.FINAL))
    assert await wait_for(lambda: single.busy == 1, timeout=10), "the busy decode never started"
    old = asyncio.create_task(single.decode(speech[:16000], DecodeOptions(partial=True), Priority.PARTIAL, key="leg"))
    assert await wait_for(lambda: single.queue_depth()["partial"] == 1, timeout=10), single.queue_depth()
    new = asyncio.create_task(single.decode(speech, DecodeOptions(partial=True), Priority.PARTIAL, key="leg"))
    with pytest.raises(Superseded):
        await old
    hyp = await new
    await busy
    assert "charged" in hyp.text.lower()
    assert single.stats()["superseded_partials"] >= 1


async def test_decode_errors_reach_the_caller_and_the_pool_keeps_serving(single):
    with pytest.raises(Exception):
        await single.decode(np.zeros((2, 2), np.float32), DecodeOptions(), Priority.FINAL)
    hyp = await single.decode(corpus.synthesize("Thank you for calling."), DecodeOptions(), Priority.FINAL)
    assert "calling" in hyp.text.lower()


async def test_a_cancelled_partial_does_not_stay_pending(single):
    """A leg closed while its partial waits (the task is cancelled) leaves nothing in the pool:
    the queued job holds the leg's audio, and the key (the leg's id) would keep it forever."""
    speech = corpus.synthesize("Please hold while I look up your account information.")
    # a full 30 s window keeps the only context busy while the partial queues (0.3 s or more)
    busy = asyncio.create_task(single.decode(speech, DecodeOptions(offline=True), Priority.FINAL))
    assert await wait_for(lambda: single.busy == 1, timeout=10), "the busy decode never started"
    partial = asyncio.create_task(single.decode(speech, DecodeOptions(partial=True), Priority.PARTIAL, key="gone"))
    assert await wait_for(lambda: "gone" in single._pending_partial, timeout=10), single.queue_depth()
    assert not busy.done(), "the busy decode ended first: the partial may not have been waiting"
    partial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await partial
    await busy
    assert "gone" not in single._pending_partial


async def test_a_worker_outlives_a_caller_whose_loop_closed_mid_decode(single):
    """A decode still running when its caller's event loop is closed (a client torn down at
    shutdown, a test's loop) must not end the worker thread: the next caller is still served."""
    speech = corpus.synthesize("Please hold while I look up your account information.")

    def abandoned_caller() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(single.decode(speech, DecodeOptions(offline=True), Priority.FINAL))
        loop.run_until_complete(asyncio.sleep(0))  # queued ...
        while single.busy == 0:  # ... and running
            loop.run_until_complete(asyncio.sleep(0.01))
        task.cancel()
        loop.close()  # the worker's result now has no loop to go to

    await asyncio.to_thread(abandoned_caller)
    assert await wait_for(lambda: single.busy == 0, timeout=30), "the abandoned decode never finished"
    assert all(t.is_alive() for t in single._threads), "a worker thread died delivering to a closed loop"
    hyp = await asyncio.wait_for(single.decode(speech, DecodeOptions(), Priority.FINAL), 60)
    assert "account" in hyp.text.lower(), hyp.text

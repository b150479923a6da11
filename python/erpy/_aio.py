"""Awaitable results: a request whose Python result is awaitable (a coroutine, ``async
def`` called by name, a future) is run to its end on an event loop of the thread that
runs requests (one per port worker, embedded context or node thread), and its value is
the answer. The shared executor (``py::Runner``, every mode) calls :func:`run`.

When the request is stopped (its timeout, a cancel, a dead caller), erpy interrupts the
thread; the task is then cancelled and given the chance to handle ``CancelledError``
(``try``/``finally`` run, ``except CancelledError`` sees it) before the caller is told
``{error, timeout}``. A loop that could not be brought back to a clean state is closed and
the next awaitable gets a new one. The loop is asyncio's current loop of its thread, so a
future made outside a coroutine (``asyncio.gather(...)`` as the expression) belongs to it
once the thread has run an awaitable; in a thread that has not, write ``async def``.
"""

from __future__ import annotations

import threading

_local = threading.local()
# The loop each thread is running a request on, by thread id: an interrupt (timeout,
# cancel) wakes it (wake()), since the exception only lands when Python code runs and a
# loop may be waiting in select().
_running: dict = {}
_CANCEL_ROUNDS = 50


def _loop(aw):
    import asyncio
    loop = getattr(_local, "loop", None)
    if asyncio.isfuture(aw):
        # A future (gather, ensure_future) made outside a coroutine belongs to asyncio's
        # current loop of this thread: that loop becomes the thread's.
        own = aw.get_loop()
        if own is not loop and not own.is_closed() and not own.is_running():
            _local.loop = own
            return own
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
        asyncio.set_event_loop(loop)
    return loop


async def _await(aw):
    return await aw


def run(aw):
    """Runs the awaitable ``aw`` to its end; returns its value or raises its error."""
    import asyncio
    loop = _loop(aw)
    task = loop.create_task(aw if asyncio.iscoroutine(aw) else _await(aw))
    tid = threading.get_ident()
    _running[tid] = loop
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            # erpy repeats its interrupt until the request returns (node mode, embedded):
            # those land here too, so the task gets a few rounds to finish its cancel.
            for _ in range(_CANCEL_ROUNDS):
                try:
                    loop.run_until_complete(task)
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
                if task.done():
                    break
        if not task.done() or _pending(loop):
            _local.loop = None
            try:
                loop.close()
            except Exception:  # noqa: BLE001 - still running somewhere: drop it
                pass
        raise
    finally:
        _running.pop(tid, None)


def wake(tid: int) -> None:
    """Wakes the loop thread ``tid`` runs a request on, if any (called by erpy's interrupt,
    with the GIL, from another thread)."""
    loop = _running.get(tid)
    if loop is not None:
        try:
            loop.call_soon_threadsafe(_nothing)
        except RuntimeError:  # closed meanwhile
            pass


def _nothing() -> None:
    pass


def _pending(loop) -> bool:
    import asyncio
    return any(not t.done() for t in asyncio.all_tasks(loop))

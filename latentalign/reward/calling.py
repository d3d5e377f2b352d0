"""How a reward function is called: by name as TRL calls it, or by position where it names its parameters
otherwise; an `async def` reward run to its end on an event loop of its own thread."""

from __future__ import annotations

import contextvars
import functools
import os
import threading

# Set (an Event) around a reward call that `guarded` may give up on; set when it does. Work the call started and
# cannot finish in time stops at it: the code reward's programs not yet run are skipped, running ones killed.
ABANDONED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("latentalign_reward_abandoned",
                                                                                  default=None)


def call_reward(fn, prompts, completions, columns: dict):
    """`fn` called as TRL calls a reward, by name (`def reward_len(completions, **kwargs)` takes no prompts), or by
    position where it names its first two parameters otherwise (`def mine(p, c, **kwargs)`)."""
    if takes_completions_by_name(fn):
        return fn(prompts=prompts, completions=completions, **columns)
    return fn(prompts, completions, **columns)


def takes_completions_by_name(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completions" in params and params["completions"].kind is not inspect.Parameter.POSITIONAL_ONLY


def is_async(fn) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


_ASYNC_LOOP: list = []  # one event loop for every async reward, run by a thread of its own


def awaited(fn):
    """An async reward (TRL takes them) as a plain one: each call runs on one event loop in a thread of its own,
    which lives as long as the process: a client bound to its loop keeps working from call to call, and a caller
    inside a running loop (a notebook) is not refused."""
    import asyncio

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _ASYNC_LOCK:
            if not _ASYNC_LOOP:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True, name="async-rewards").start()
                _ASYNC_LOOP.append(loop)
            loop = _ASYNC_LOOP[0]
        if threading.current_thread().name == "async-rewards":  # a reward awaited inside another: a loop of its own
            box: dict = {}

            def target():
                try:
                    box["value"] = asyncio.run(fn(*args, **kwargs))
                except BaseException as err:  # noqa: BLE001 -- raised again in the caller's thread
                    box["error"] = err

            worker = threading.Thread(target=target)
            worker.start()
            worker.join()
            if "error" in box:
                raise box["error"]
            return box["value"]
        return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), loop).result()

    return run


_ASYNC_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has the loop but not the thread that runs it
    os.register_at_fork(after_in_child=_ASYNC_LOOP.clear)

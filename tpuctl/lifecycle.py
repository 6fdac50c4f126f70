"""A TPU's life through the Cloud TPU API: create it (asking again, with jittered exponential backoff, while the API
says there is no capacity or quota), wait until it is READY, delete it. `tpuctl create` / `delete` and babysit use
these; what happens is told through `say` (one line per change), so the CLI can show it however it likes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpuctl import defaults
from tpuctl.cloud import UnreadOperation  # light: the client library is imported inside TpuApi
from tpuctl.errors import CloudError

if TYPE_CHECKING:
    from tpuctl.cloud import Node, NodeRequest, TpuApi

Say = Callable[[str], None]
# States a node does not come back from by itself: it must be deleted (and made again).
DEAD_STATES = frozenset({"PREEMPTED", "TERMINATED"})


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: initial, x factor each time, at most `maximum`; each one drawn uniformly from
    [wait x (1 - jitter), wait] so that many clients retrying at once spread out."""

    initial: float = defaults.CREATE_BACKOFF_S
    maximum: float = defaults.CREATE_BACKOFF_MAX_S
    factor: float = 2.0
    jitter: float = 0.5

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        wait = self.initial
        while True:
            yield wait * (1 - self.jitter * rng.random())
            wait = min(wait * self.factor, self.maximum)


def create(
    api: TpuApi,
    request: NodeRequest,
    *,
    zones: Sequence[str] = (),
    wait: bool = True,
    attempts: int = defaults.CREATE_ATTEMPTS,
    backoff: Backoff = Backoff(),
    timeout: float = defaults.READY_TIMEOUT_S,
    poll: float = 5.0,
    say: Say = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
    cancel_on_timeout: bool = False,
) -> Node | None:
    """Create the node (queued, if the request says so); with `wait`, return it once READY (its `zone` says where).

    Capacity and quota refusals are retried up to `attempts` times, whether the API refuses at once or the operation
    fails later. With several `zones`, each attempt goes through them in order: a zone that refuses for capacity or
    quota hands the request to the next, and only when every zone has refused does the backoff wait begin.
    """
    zones = tuple(zones) or (str(api.zone),)
    delays = backoff.delays()
    for attempt in range(1, attempts + 1):
        refusals: list[str] = []
        for i, zone in enumerate(zones):
            here = api if zone == api.zone else api.in_zone(zone)
            try:
                operation = here.create(request)
                where = f" in {zone}" if len(zones) > 1 else ""
                if not wait or isinstance(operation, UnreadOperation):
                    say(f"{request.name}: creation accepted{where} ({operation.operation.name})")
                if not wait:
                    return None
                node = wait_ready(
                    here,
                    request,
                    operation,
                    timeout=timeout,
                    poll=poll,
                    say=say,
                    sleep=sleep,
                    cancel_on_timeout=cancel_on_timeout,
                )
                if where:
                    say(f"{request.name}: got zone {zone}")
                return node
            except CloudError as e:
                if not e.retryable:
                    raise
                refusals.append(zone)
                if i + 1 < len(zones):
                    say(f"{request.name}: {zone} refused ({e.message}); trying {zones[i + 1]}")
                    continue
                if attempt == attempts:
                    if len(zones) > 1:
                        e.message = f"{e.message}; every zone refused ({', '.join(zones)})"
                    e.message = f"{e.message}; gave up after {attempts} attempts"
                    e.hint = "try other zones (--zones), --spot, or --queued to wait in line for capacity"
                    raise
                delay = next(delays)
                shown = f"{delay:.1f}" if delay < 10 else f"{delay:.0f}"
                what = f"every zone refused ({', '.join(refusals)})" if len(zones) > 1 else f"failed: {e.message}"
                say(f"{request.name}: attempt {attempt}/{attempts} {what}; again in {shown} s")
                sleep(delay)
    raise AssertionError("unreachable")


def wait_ready(
    api: TpuApi,
    request: NodeRequest,
    operation: Any,
    *,
    timeout: float,
    poll: float,
    say: Say,
    sleep: Callable[[float], None] = time.sleep,
    cancel_on_timeout: bool = False,
) -> Node:
    """Poll until the node is READY with its workers; the operation's or the queue's failure raises CloudError. A
    queued resource still waiting at the timeout stays in the queue (said), or is deleted with `cancel_on_timeout`."""
    deadline = time.monotonic() + timeout
    doing = f"creating TPU {request.name!r}"
    last = ""
    while True:
        error = api.operation_error(operation, doing)
        if error is not None:
            _clean_up_failed(api, request, poll, sleep)
            raise error
        queued = api.get_queued(request.name) if request.queued else None
        queue = queued.state if queued else ""
        if queued is not None and queue in ("FAILED", "SUSPENDED"):
            _clean_up_failed(api, request, poll, sleep)
            why = f": {queued.failure}" if queued.failure else ""
            failed = CloudError(f"{doing}: its queued resource is {queue}{why}")
            failed.retryable = True  # the queue gave up on capacity: another attempt queues again
            raise failed
        node = api.find_node(request.name)
        state = node.state if node else (f"queued: {queue}" if queue else "requested")
        if node is not None and node.state == "READY" and node.workers:
            say(f"{request.name}: READY, {len(node.workers)} workers")
            return node
        if node is not None and node.state in DEAD_STATES:
            raise CloudError(f"{doing}: it became {node.state} before it was READY", "delete it and try again")
        if state != last:
            say(f"{request.name}: {state}")
            last = state
        if time.monotonic() > deadline:
            if node is None and queue:  # still in line: the request outlives tpuctl's wait, and may yet be billed
                if cancel_on_timeout:
                    delete_queued(api, request.name, wait=False, say=say)
                    raise CloudError(f"{doing}: not READY after {timeout:.0f} s (still {state}); request cancelled")
                raise CloudError(
                    f"{doing}: not READY after {timeout:.0f} s; its queued resource is still {queue} and may yet"
                    " provision (and bill)",
                    f"`tpuctl describe {request.name}` follows it; `tpuctl delete {request.name}` cancels it"
                    " (or create with --cancel-on-timeout)",
                )
            raise CloudError(f"{doing}: not READY after {timeout:.0f} s (still {state})", "see `tpuctl describe`")
        sleep(poll)


def delete(
    api: TpuApi,
    node: Node,
    *,
    wait: bool = True,
    timeout: float = 1800.0,
    poll: float = 5.0,
    say: Say = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Delete the node (with its queued resource, if one made it); with `wait`, return once it is gone."""
    operation = api.delete(node)
    say(f"{node.name}: deleting")
    if not wait:
        return
    doing = f"deleting TPU {node.name!r}"

    def gone() -> bool:
        error = api.operation_error(operation, doing)
        if error is not None:
            raise error
        return api.find_node(node.name) is None

    _wait_until(gone, CloudError(f"{doing}: still there after {timeout:.0f} s"), timeout, poll, sleep)
    say(f"{node.name}: deleted")


def delete_queued(
    api: TpuApi,
    name: str,
    *,
    wait: bool = True,
    timeout: float = 600.0,
    poll: float = 5.0,
    say: Say = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Cancel the queued resource `name` (with its node, if it made one); with `wait`, return once it is gone."""
    api.delete_queued(name)
    say(f"{name}: deleting its queued resource")
    if not wait:
        return
    timed_out = CloudError(f"deleting queued resource {name!r}: still there after {timeout:.0f} s")
    _wait_until(lambda: api.get_queued(name) is None, timed_out, timeout, poll, sleep)
    say(f"{name}: deleted")


def add_ssh_key(
    api: TpuApi,
    name: str,
    user: str,
    public: str,
    *,
    timeout: float = 300.0,
    poll: float = 2.0,
    say: Say = lambda _: None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Authorise `public` (`type base64`) for `user` on TPU `name` through its `ssh-keys` metadata, as gcloud does:
    every other key and every other user's line kept, ours added once. The API replaces the metadata as a whole and
    the node carries no fingerprint, so a concurrent writer could drop our line (or we theirs: we write what we just
    read): after the write the node is read again, and written again while our line is missing. True when it wrote,
    False when the key was there already."""
    from tpuctl import keys

    doing = f"adding your SSH key to TPU {name!r}"
    deadline = time.monotonic() + timeout
    wrote = False
    while True:
        metadata = dict(api.get_node(name).metadata)
        merged = keys.with_key(metadata.get(keys.SSH_KEYS, ""), user, public)
        if merged is None:
            if wrote:
                say(f"{name}: SSH key for {user!r} in the node's metadata")
            return wrote
        if time.monotonic() > deadline:
            raise CloudError(f"{doing}: the key was still missing after {timeout:.0f} s", "try again")
        operation = api.set_metadata(name, {**metadata, keys.SSH_KEYS: merged})
        wrote = True

        def updated(operation: Any = operation) -> bool:
            error = api.operation_error(operation, doing)
            if error is not None:
                raise error
            if isinstance(operation, UnreadOperation):  # the node tells instead
                return keys.has_key(dict(api.get_node(name).metadata).get(keys.SSH_KEYS, ""), user, public)
            return bool(operation.done())

        # a metadata update takes seconds, not minutes: look soon, then less often
        timed_out = CloudError(f"{doing}: not done after {timeout:.0f} s")
        _wait_until(updated, timed_out, timeout, poll, sleep, first=min(0.25, poll))


def _wait_until(
    done: Callable[[], bool],
    timed_out: CloudError,
    timeout: float,
    poll: float,
    sleep: Callable[[float], None],
    first: float | None = None,
) -> None:
    """Poll `done` every `poll` seconds (or from `first` seconds, growing by half each time up to `poll`);
    `timed_out` is raised once `timeout` has passed without it."""
    deadline = time.monotonic() + timeout
    pause = poll if first is None else first
    while not done():
        if time.monotonic() > deadline:
            raise timed_out
        sleep(pause)
        pause = min(pause * 1.5, poll)


def _clean_up_failed(api: TpuApi, request: NodeRequest, poll: float, sleep: Callable[[float], None]) -> None:
    """A failed creation must not leave a half-made node or a dead queued resource holding the name (and quota):
    delete what is left and wait until it is gone, so that the next attempt can use the name."""
    node = api.find_node(request.name)
    if node is not None and node.state != "DELETING":
        api.delete(node)
    elif node is None and request.queued and api.queued_state(request.name):
        api.delete_queued(request.name)
    left = CloudError(f"TPU {request.name!r}: a failed creation left it behind", f"tpuctl delete {request.name}")
    _wait_until(
        lambda: api.find_node(request.name) is None and not (request.queued and api.queued_state(request.name)),
        left,
        600,
        poll,
        sleep,
    )

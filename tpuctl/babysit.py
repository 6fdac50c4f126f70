"""Keep one training run alive until every stage is trained, through preemptions, lost workers and crashes.

One round: make sure the TPU is READY (create it when it is missing; delete it and create it again when it is
PREEMPTED, TERMINATED or unhealthy for longer than a grace, but only a TPU babysit created itself, or with
`recreate`), sync the project, prepare the workers, free their chips, start the run (which resumes from the
workdir's newest checkpoint), then watch the TPU and the run. The run's end decides: every stage trained -> done;
a preempted or vanished TPU, a worker that stays unreachable, or a trainer that failed or died -> another round after
a jittered exponential backoff, at most `max_restarts` of them.

Everything that happens is an event in a state file ($XDG_STATE_HOME/tpuctl/babysit/<run>.json), written as it
happens: babysit itself killed and started again reads it back (how many restarts, whether it created the TPU, the
timeline) and, if the run is still training, goes back to watching it instead of starting it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import defaults, launch, lifecycle, registry
from tpuctl.cloud import creation_zones
from tpuctl.errors import CloudError, GaveUpError, TpuctlError

if TYPE_CHECKING:
    from tpuctl.cloud import Node, NodeRequest, TpuApi
    from tpuctl.config import Settings
    from tpuctl.ops import WorkerReport
    from tpuctl.registry import RunRecord

Say = Callable[[str], None]
UNHEALTHY = frozenset({"UNHEALTHY_TENSORFLOW", "UNHEALTHY_MAINTENANCE", "TIMEOUT"})  # Node.Health values
LOST_AFTER = 3  # consecutive looks at which a worker of a READY TPU is unreachable before the round is over
API_PATIENCE = 30  # consecutive failed looks at the TPU before babysit gives up (30 polls: 30 min by default)


@dataclass
class Event:
    at: float
    what: str  # created, deleted, launched, preempted, worker-lost, crashed, done, gave-up, ...
    detail: str = ""


@dataclass
class State:
    run: str
    tpu: str
    zone: str = ""  # where the TPU is, once babysit has found or made it (with --zones, it may be any of them)
    created_tpu: bool = False  # babysit made this TPU: it may delete it
    restarts: int = 0
    finished: bool = False
    events: list[Event] = field(default_factory=list)

    @staticmethod
    def path(run: str) -> Path:
        return registry.state_dir().parent / "babysit" / f"{registry.slug(run)}.json"

    def save(self) -> None:
        path = self.path(self.run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        os.replace(tmp, path)  # never a half-written state, even if babysit is killed mid-write

    @classmethod
    def load(cls, run: str, tpu: str) -> State:
        path = cls.path(run)
        if not path.exists():
            return cls(run=run, tpu=tpu)
        try:
            raw = json.loads(path.read_text())
            state = cls(**{**raw, "events": [Event(**e) for e in raw.get("events", [])]})
        except (OSError, ValueError, TypeError) as e:
            raise TpuctlError(f"cannot read babysit's state {path}: {e}", "remove it to start afresh") from None
        if state.tpu != tpu:
            raise TpuctlError(
                f"run {run!r} was babysat on TPU {state.tpu!r}, not {tpu!r}", f"use --tpu {state.tpu} or remove {path}"
            )
        return state


def babysit_backoff(initial: float) -> lifecycle.Backoff:
    """The waits before babysit's restarts: `initial`, then x2, to the cap."""
    return lifecycle.Backoff(initial=initial, maximum=defaults.BABYSIT_BACKOFF_MAX_S)


@dataclass(frozen=True)
class Options:
    max_restarts: int = defaults.BABYSIT_MAX_RESTARTS
    recreate: bool = False  # may delete (and make again) a TPU babysit did not create
    poll: float = defaults.BABYSIT_POLL_S  # seconds between looks at the TPU and the run
    unhealthy_grace: float = defaults.UNHEALTHY_GRACE_S  # seconds a READY TPU may stay unhealthy before it is remade
    backoff: lifecycle.Backoff = field(default_factory=lambda: babysit_backoff(defaults.BABYSIT_BACKOFF_S))
    create_attempts: int = defaults.BABYSIT_CREATE_ATTEMPTS


class Babysitter:
    def __init__(
        self,
        settings: Settings,
        api: TpuApi,
        project: Path,
        record: RunRecord,
        request: NodeRequest | None,
        options: Options,
        say: Say,
        sleep: Callable[[float], None] = time.sleep,
    ):
        assert settings.tpu is not None
        self.settings, self.api, self.project, self.record = settings, api, project, record
        self.request, self.options, self.say, self.sleep = request, options, say, sleep
        self.state = State.load(record.name, settings.tpu)
        self.fresh_workers = False  # the TPU was just made: its workers' host keys are new, and expected
        self.zones = creation_zones(settings)  # where a TPU may be made, in order
        if self.state.zone:
            self.in_zone(self.state.zone)
        elif len(self.zones) == 1:
            self.in_zone(self.zones[0])

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> State:
        if self.state.finished:
            path = State.path(self.record.name)
            self.note("done", f"already finished earlier; to babysit run {self.record.name!r} again, remove {path}")
            return self.state
        if self.state.events:
            self.note("resumed", f"babysit started again after {self.state.restarts} restarts")
        delays = self.options.backoff.delays()
        while True:
            outcome, detail = self.round()
            if outcome == "done":
                self.state.finished = True
                self.note("done", detail)
                return self.state
            self.note(outcome, detail)
            if self.state.restarts >= self.options.max_restarts:
                self.note("gave-up", f"{self.state.restarts} restarts, the most allowed (--max-restarts)")
                raise GaveUpError(
                    f"run {self.record.name!r} is not finished after {self.state.restarts} restarts (last: {outcome})",
                    f"see the timeline above; `tpuctl babysit` again continues from {self.record.workdir}",
                )
            self.state.restarts += 1
            delay = next(delays)
            self.note("waiting", f"restart {self.state.restarts}/{self.options.max_restarts} in {delay:.0f} s")
            self.sleep(delay)

    def round(self) -> tuple[str, str]:
        """One TPU, one launch (or one adoption of a run already training), watched to its end: (outcome, detail)."""
        node = self.ready_tpu()
        target = self.target(node)
        if not self.adopt(target):
            problem = self.start_run(target)
            if problem:
                return "launch-failed", problem
        return self.watch(target)

    # -- the TPU --------------------------------------------------------------------------------------------

    def ready_tpu(self) -> Node:
        name = self.state.tpu
        unhealthy_since: float | None = None
        while True:
            node = self.look_up()
            if node is None and self.waiting_in_queue():
                self.sleep(self.options.poll)
                continue
            if node is None:
                return self.create(f"TPU {name!r} does not exist")
            if node.state in lifecycle.DEAD_STATES:
                return self.recreate(node, f"TPU {name!r} is {node.state}")
            if node.state == "READY" and node.health in UNHEALTHY:
                unhealthy_since = unhealthy_since or time.monotonic()
                if time.monotonic() - unhealthy_since > self.options.unhealthy_grace:
                    return self.recreate(node, f"TPU {name!r} is {node.health}: {node.health_description}")
            elif node.state == "READY" and node.workers:
                return node
            self.say(f"TPU {name!r} is {node.state}{f' ({node.health})' if node.health else ''}; waiting")
            self.sleep(self.options.poll)

    def waiting_in_queue(self) -> bool:
        """A queued resource of the TPU's name with no node yet (`tpuctl create --queued`): while it waits in line,
        babysit waits with it, rather than ask for the same TPU a second time. One that failed or was suspended is
        cleared first, if babysit may (it made the TPU, or --recreate), and the TPU created anew."""
        try:
            waiting = self.api.get_queued(self.state.tpu)
        except CloudError as e:  # no answer about the queue: creating will say what is wrong, if anything
            self.say(f"queued resources not checked ({e.message})")
            return False
        if waiting is None:
            return False
        if waiting.state not in ("FAILED", "SUSPENDED"):
            self.say(f"queued resource {waiting.name!r} is {waiting.state}; waiting for its TPU")
            return True
        why = f"queued resource {waiting.name!r} is {waiting.state}{f': {waiting.failure}' if waiting.failure else ''}"
        if not (self.state.created_tpu or self.options.recreate):
            raise TpuctlError(
                f"{why}; babysit did not create it, so it will not delete it",
                f"`tpuctl delete {waiting.name}`, or pass --recreate to let babysit do it",
            )
        self.note("deleting", why)
        lifecycle.delete_queued(self.api, waiting.name, poll=self.settings.api_poll, say=self.say, sleep=self.sleep)
        return False

    def in_zone(self, zone: str) -> None:
        """The TPU is in `zone` from now on: the API, the workers' settings and the run's record follow it."""
        self.state.zone = zone
        self.api = self.api.in_zone(zone)
        self.settings = dataclasses.replace(self.settings, zone=zone)
        self.record = dataclasses.replace(self.record, zone=zone)

    def find(self) -> Node | None:
        """The TPU in its zone; while that is not known yet (several --zones), in the first zone that has it."""
        if self.state.zone:
            return self.api.find_node(self.state.tpu)
        for zone in self.zones:
            node = self.api.in_zone(zone).find_node(self.state.tpu)
            if node is not None:
                self.in_zone(zone)
                return node
        return None

    def look_up(self) -> Node | None:
        """The TPU as the API sees it. The API failing for a while (a network blip, a 5xx, even a permission hiccup)
        must not end a run that may be training fine: babysit says so and asks again, up to API_PATIENCE times."""
        for attempt in range(1, API_PATIENCE + 1):
            try:
                return self.find()
            except CloudError as e:
                if attempt == API_PATIENCE:
                    raise
                self.say(f"the Cloud TPU API failed ({e}); asking again in {self.options.poll:.0f} s")
                self.sleep(self.options.poll)
        raise AssertionError("unreachable")

    def create(self, why: str) -> Node:
        if self.request is None:
            raise TpuctlError(f"{why}, and babysit does not know what to create", "give --type (and --runtime)")
        self.note("creating", why)
        node = lifecycle.create(
            self.api,
            self.request,
            zones=self.zones,
            attempts=self.options.create_attempts,
            backoff=self.options.backoff,
            poll=self.settings.api_poll,
            say=self.say,
            sleep=self.sleep,
        )
        assert node is not None
        self.in_zone(node.zone)
        self.state.created_tpu = True
        self.fresh_workers = True
        where = f" in {node.zone}" if len(self.zones) > 1 else ""
        self.note("created", f"{node.accelerator_type}, {len(node.workers)} workers{where}")
        return node

    def recreate(self, node: Node, why: str) -> Node:
        if not (self.state.created_tpu or self.options.recreate):
            raise TpuctlError(
                f"{why}; babysit did not create it, so it will not delete it",
                "delete it yourself, or pass --recreate to let babysit do it",
            )
        self.note("deleting", why)
        lifecycle.delete(self.api, node, poll=self.settings.api_poll, say=self.say, sleep=self.sleep)
        self.note("deleted", node.name)
        if self.request is None:  # make the same TPU again
            from tpuctl.cloud import NodeRequest

            self.request = NodeRequest.like(node)
        return self.create(why)

    # -- the run --------------------------------------------------------------------------------------------

    def target(self, node: Node) -> launch.Target:
        """The node's workers, with tpuctl's key authorised there first (a TPU babysit made has it from its
        creation; one it found may not, or may use OS Login)."""
        from tpuctl import access
        from tpuctl.fleet import Fleet

        settings = self.settings
        if self.fresh_workers:  # VMs babysit just made: new host keys are expected, not an attack
            settings = dataclasses.replace(settings, replace_host_keys=True)
        prepared = access.prepare(settings, node, self.say)
        if prepared.added:
            seen: set[int] = set()

            def progress(done: int, total: int) -> None:
                if done not in seen:
                    seen.add(done)
                    self.say(f"{done}/{total} workers accept the key")

            access.wait_accepted(prepared.settings, node.workers, progress, sleep=self.sleep)
        return launch.pod_target(prepared.settings, Fleet(prepared.settings, node.workers, source=node.source))

    def adopt(self, target: launch.Target) -> bool:
        """A run already training on these workers (babysit was restarted): watch it rather than start it again."""
        if self.fresh_workers:
            return False
        reports = launch.status(target.fleet.settings, target, self.record)
        if reports and all(r.error is None and r.state == "running" for r in reports):
            self.note("adopted", f"run {self.record.name!r} is training on {len(reports)} workers")
            return True
        return False

    def start_run(self, target: launch.Target) -> str:
        """Sync, prepare, replace what is left of an earlier round, free the chips, start (launch.launch, as
        `tpuctl run` does); a problem as one line (then the round is over), else ""."""
        try:
            self.record, reports = launch.launch(
                target.fleet.settings,
                target,
                self.record,
                project=self.project,
                sync=True,
                prepare=True,
                replace_earlier=True,
                busy="kill",
                say=self.say,
            )
        except launch.LaunchFailed as e:
            return str(e)
        self.fresh_workers = False
        self.note("launched", f"on {len(reports)} workers ({', '.join(target.hosts)})")
        return ""

    def watch(self, target: launch.Target) -> tuple[str, str]:
        settings = target.fleet.settings
        unreachable = 0
        while True:
            self.sleep(self.options.poll)
            node = self.look_up()
            if node is None or node.state in lifecycle.DEAD_STATES:
                return "preempted", f"TPU {self.state.tpu!r} is {node.state if node else 'gone'}"
            reports = launch.status(settings, target, self.record)
            outcome = judge(reports)
            if outcome is None:
                unreachable = 0
                continue
            what, detail = outcome
            if what == "unreachable":
                unreachable += 1
                if unreachable < LOST_AFTER:
                    continue
                what = "worker-lost"
            return what, detail

    def note(self, what: str, detail: str = "") -> None:
        self.state.events.append(Event(time.time(), what, detail))
        self.state.save()
        self.say(f"{what}: {detail}" if detail else what)


def judge(reports: list[WorkerReport]) -> tuple[str, str] | None:
    """How the run stands from its workers' status: None while it trains, else (outcome, detail)."""
    lost = [r for r in reports if r.error]
    if lost:
        return "unreachable", f"w{lost[0].index} ({lost[0].ip}): {lost[0].error}"
    states = [r.state for r in reports]
    if states and all(s == "done" for s in states):
        last = reports[0].data.get("checkpoint") or "-"
        return "done", f"every stage trained (last checkpoint {last})"
    bad = [r for r in reports if r.state in ("failed", "dead", "absent", "stopped")]
    if bad:
        r = bad[0]
        how = f"exit {r.data.get('exit_code')}" if r.state == "failed" else r.state
        return "crashed", f"w{r.index}: trainer {how}: {r.data.get('last_line', '')[-160:]}"
    return None


def timeline(state: State) -> list[tuple[str, str, str]]:
    """(time, what, detail) rows, the time relative to the first event."""
    if not state.events:
        return []
    start = state.events[0].at
    return [(f"+{e.at - start:7.1f} s", e.what, e.detail) for e in state.events]


def to_json(state: State) -> dict[str, Any]:
    return dataclasses.asdict(state)

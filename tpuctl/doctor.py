"""`tpuctl doctor`: what a new user is missing before a pod works for them, one finding per step, each with its fix.

The steps are those of every fleet command, in order, and a step that cannot be checked because an earlier one
failed says so (skipped) rather than failing again for the same reason. It only reads: no key is made or added, no
job touched (the fleet commands do that; doctor says which one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from tpuctl import keys, remote
from tpuctl.errors import TpuctlError
from tpuctl.render import count

if TYPE_CHECKING:
    from tpuctl.cloud import Node, TpuApi
    from tpuctl.config import Settings
    from tpuctl.fleet import WorkerResult

PASS, FAIL, SKIP = "pass", "fail", "skipped"


@dataclass(frozen=True)
class Finding:
    check: str
    result: str  # pass | fail | skipped
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Doctor:
    """Runs the checks in order; each later one sees what the earlier ones found."""

    def __init__(self, settings: Settings, on_finding: Callable[[Finding], None] = lambda _: None):
        self.settings = settings
        self.findings: list[Finding] = []
        self._on_finding = on_finding

    @property
    def ok(self) -> bool:
        return all(f.result == PASS for f in self.findings)

    def _add(self, check: str, result: str, detail: str, fix: str = "") -> None:
        finding = Finding(check, result, detail, fix)
        self.findings.append(finding)
        self._on_finding(finding)

    def _skip(self, *checks: str, why: str) -> None:
        for check in checks:
            self._add(check, SKIP, why)

    def run(self) -> list[Finding]:
        later = ("tpu", "ssh key", "workers", "remote dir", "tools", "chips")
        if not self._credentials():
            self._skip("tpu api", *later, why="needs credentials")
            return self.findings
        api = self._api()
        if api is None:
            self._skip(*later, why="needs the Cloud TPU API")
            return self.findings
        node = self._node(api)
        if node is None:
            self._skip(*later[1:], why="needs a READY TPU")
            return self.findings
        settings = self._key(node)
        if settings is None:
            self._skip(*later[2:], why="needs tpuctl's key authorised on the workers")
            return self.findings
        results = self._workers(settings, node)
        reached = [r for r in results if r.ok]
        if not reached:
            self._skip(*later[3:], why="no worker reachable")
            return self.findings
        self._remote(reached)
        self._chips(settings, node, [r.worker.index for r in reached])
        return self.findings

    # -- the checks ------------------------------------------------------------------------------------------

    def _credentials(self) -> bool:
        s = self.settings
        if s.api_endpoint.startswith("http://"):
            self._add("credentials", PASS, f"none needed: the API endpoint {s.api_endpoint} is an emulator")
            return True
        import google.auth
        import google.auth.exceptions

        try:
            credentials, _ = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            self._add(
                "credentials",
                FAIL,
                "no Application Default Credentials found",
                "gcloud auth application-default login",
            )
            return False
        who = getattr(credentials, "service_account_email", None) or s.account or "a user account (set account)"
        self._add("credentials", PASS, f"Application Default Credentials of {who}")
        return True

    def _api(self) -> TpuApi | None:
        """The API that holds the TPU (backend auto: the Cloud TPU API's node, else Compute Engine's slice),
        checked by listing what it has in the zone."""
        from tpuctl import slices

        try:
            self.settings.require("project", "zone", "tpu")
            api = slices.compute_api(self.settings) if self.settings.backend == "compute" else None
            if api is None:
                api = slices.tpu_api(self.settings)
                nodes = api.list_nodes()
                if self.settings.backend == "auto" and not any(n.name == self.settings.tpu for n in nodes):
                    found, node = slices.find(self.settings, str(self.settings.tpu))
                    api = found if node is not None else api
            if api.source == "compute":
                nodes = api.list_nodes()
        except TpuctlError as e:
            self._add("tpu api", FAIL, e.message, e.hint or "")
            return None
        if api.source == "compute":
            where = "Compute Engine reachable and enabled; instanceGroupManagers.list and instances.list allowed"
            self._add("tpu api", PASS, f"{where} ({count(len(nodes), 'TPU slice')} in {api.project}/{api.zone})")
            return api
        self._add(
            "tpu api",
            PASS,
            f"reachable and enabled; tpu.nodes.list allowed ({count(len(nodes), 'TPU')} in {api.project}/{api.zone})",
        )
        return api

    def _node(self, api: TpuApi) -> Node | None:
        tpu = self.settings.tpu or ""
        try:
            node = api.get_node(tpu)
        except TpuctlError as e:
            self._add("tpu", FAIL, e.message, e.hint or "")
            return None
        health = node.health or "health unreported"
        detail = f"{node.name}: {node.accelerator_type}, {len(node.workers)} workers, {node.state}, {health}"
        if node.state != "READY" or not node.workers:
            self._add("tpu", FAIL, detail, "see `tpuctl describe`; a PREEMPTED or stopped TPU: `tpuctl babysit`")
            return None
        if node.health not in ("", "HEALTHY", "HEALTH_UNSPECIFIED"):
            self._add("tpu", FAIL, f"{detail}: {node.health_description or 'unhealthy'}", "see `tpuctl describe`")
            return node  # it may still answer: go on
        self._add("tpu", PASS, detail)
        return node

    def _key(self, node: Node) -> Settings | None:
        """Whether tpuctl's key is authorised for the user it logs in as (read only); the settings to connect with."""
        from tpuctl.access import uses_oslogin

        s = self.settings
        path = s.path("ssh_key")
        if not path.exists():
            fix = (
                "any fleet command makes and adds it, e.g. `tpuctl check`"
                if keys.managed(s)
                else "set --ssh-key to the key the workers accept, or ssh_keys = auto"
            )
            self._add("ssh key", FAIL, f"{path} does not exist", fix)
            return None
        try:
            public = keys.public_key(path)
        except TpuctlError as e:
            self._add("ssh key", FAIL, e.message, e.hint or "")
            return None
        if not keys.managed(s):
            self._add("ssh key", PASS, f"{path} (ssh_keys = off: authorised by you, not checked here)")
            return s
        notes: list[str] = []
        if uses_oslogin(s, node, notes.append):
            return self._oslogin_key(public)
        if notes:  # the project's metadata could not be read: say so with whatever follows
            self._add("ssh key", FAIL, notes[0], "set ssh_keys = oslogin or ssh_keys = metadata")
            return None
        if keys.has_key(dict(node.metadata).get(keys.SSH_KEYS, ""), s.ssh_user, public):
            self._add("ssh key", PASS, f"{path} is in the TPU's ssh-keys metadata for {s.ssh_user!r}")
            return s
        self._add(
            "ssh key",
            FAIL,
            f"{path} is not in the TPU's ssh-keys metadata for {s.ssh_user!r}",
            "any fleet command adds it (needs tpu.nodes.update, e.g. roles/tpu.admin), e.g. `tpuctl check`",
        )
        return None

    def _oslogin_key(self, public: str) -> Settings | None:
        from tpuctl.oslogin import OsLogin

        s = self.settings
        try:
            oslogin = OsLogin(s)
            user = oslogin.login_user(public)
        except TpuctlError as e:
            self._add("ssh key", FAIL, f"OS Login: {e.message}", e.hint or "")
            return None
        if user is None:
            self._add(
                "ssh key",
                FAIL,
                f"OS Login: {s.ssh_key} is not in the profile of {oslogin.account} (or it has no POSIX account yet)",
                "any fleet command imports it, e.g. `tpuctl check`",
            )
            return None
        self._add("ssh key", PASS, f"OS Login: in the profile of {oslogin.account}, logging in as {user!r}")
        if s.sources.get("ssh_user", "default").startswith("default"):
            return replace(s, ssh_user=user)
        return s

    def _workers(self, settings: Settings, node: Node) -> list[WorkerResult]:
        from tpuctl.fleet import Fleet

        results = Fleet(settings, node.workers).run(remote.doctor_command(settings.remote_dir, settings.python))
        bad = [r for r in results if not r.ok]
        via = f" through {settings.ssh_proxy}" if settings.ssh_proxy else ""
        detail = f"{len(results) - len(bad)}/{len(results)} reachable over SSH as {settings.ssh_user!r}{via}"
        if bad:
            first = bad[0]
            self._add(
                "workers",
                FAIL,
                f"{detail}; w{first.worker.index} ({first.host}): {first.error or first.stderr.strip()[-200:]}",
                "see `tpuctl exec -- true` for every worker; a refused key: `tpuctl check` adds it",
            )
        else:
            self._add("workers", PASS, detail)
        return results

    def _remote(self, reached: list[WorkerResult]) -> None:
        s = self.settings
        answers = [remote.doctor_answer(r.stdout) for r in reached]
        no_dir = [r.worker.index for r, a in zip(reached, answers, strict=True) if not a.get("dir")]
        if no_dir:
            self._add("remote dir", FAIL, f"{s.remote_dir} missing on {_workers(no_dir)}", "tpuctl sync .")
        else:
            self._add("remote dir", PASS, f"{s.remote_dir} on every worker reached")
        missing = {t for a in answers for t, found in a.get("tools", {}).items() if not found}
        if missing:
            lacking = {
                t: [r.worker.index for r, a in zip(reached, answers, strict=True) if not a["tools"][t]]
                for t in sorted(missing)
            }
            detail = "; ".join(f"{t} missing on {_workers(ws)}" for t, ws in lacking.items())
            self._add("tools", FAIL, detail, f"tpuctl prepare --apt-packages {','.join(sorted(missing))}")
        else:
            self._add("tools", PASS, f"{s.python}, rsync and tmux on every worker reached")

    def _chips(self, settings: Settings, node: Node, indices: list[int]) -> None:
        from tpuctl import ops
        from tpuctl.fleet import Fleet

        reports = ops.check(settings, Fleet(settings, [node.workers[i] for i in indices]))
        busy = [r.index for r in reports if r.state == "busy"]
        unknown = [r.index for r in reports if r.state == "unknown"]
        if busy or unknown:
            parts = [f"busy on {_workers(busy)}" if busy else "", f"unknown on {_workers(unknown)}" if unknown else ""]
            self._add("chips", FAIL, "; ".join(p for p in parts if p), "see `tpuctl check`; `tpuctl kill` frees them")
        else:
            self._add("chips", PASS, f"free on the {len(reports)} workers reached")


def _workers(indices: list[int]) -> str:
    names = ", ".join(f"w{i}" for i in indices[:8])
    return names + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")

"""tpuctl: the command line. One thin function per command: parse, call the library, print.

Output: data on stdout (tables, command output, --json), messages and summaries on stderr.
Exit codes: tpuctl.errors.EXIT_CODES, the one list (shown by --help).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tpuctl import __version__, config, render
from tpuctl.defaults import KILL_GRACE_S
from tpuctl.errors import EXIT_CODES, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, TpuctlError
from tpuctl.options import dry_run_option, fleet_options, json_option, setting_options

if TYPE_CHECKING:
    from tpuctl.cloud import Node
    from tpuctl.config import Settings
    from tpuctl.fleet import Fleet, WorkerResult
    from tpuctl.ops import WorkerReport

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# `tpuctl --help` ends with the exit codes ("\b": click keeps the lines as they are)
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code:<3}  {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.option("--profile", envvar="TPUCTL_PROFILE", help="Profile of ~/.config/tpuctl/config.toml [env TPUCTL_PROFILE]")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="tpuctl")
@click.pass_context
def cli(ctx: click.Context, profile: str | None, verbose: bool) -> None:
    """Run CLIP training on Cloud TPU pods: find the workers, sync, prepare, check, kill, clean.

    \b
    Examples:
      tpuctl list --zone us-central2-b
      tpuctl sync . --tpu my-pod
      tpuctl exec --tpu my-pod -- 'nproc; df -h /'
      tpuctl check --tpu my-pod --json
    """
    ctx.ensure_object(dict).update(profile=profile, verbose=verbose)  # main() reads "verbose" back


def _settings(flags: dict[str, Any]) -> Settings:
    ctx = click.get_current_context()
    return config.resolve(flags, profile=ctx.find_root().obj["profile"])


def _node(settings: Settings) -> Node:
    from tpuctl.cloud import TpuApi

    settings.require("tpu")
    assert settings.tpu is not None
    node = TpuApi(settings).get_node(settings.tpu)
    if node.state != "READY":
        raise TpuctlError(f"TPU {node.name!r} is {node.state}, not READY", "see `tpuctl list` for its state")
    if not node.workers:
        raise TpuctlError(f"TPU {node.name!r} reports no workers yet", "wait until it is READY")
    return node


def _fleet(settings: Settings, workers: str = "all") -> Fleet:
    from tpuctl.fleet import Fleet

    node = _node(settings)
    return Fleet(settings, [node.workers[i] for i in parse_workers(workers, len(node.workers))])


def parse_workers(spec: str, count: int) -> list[int]:
    """'all', '3', '0,3,5' or '0-3' -> worker indices, checked against the node's worker count."""
    if spec == "all":
        return list(range(count))
    indices: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            indices += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise TpuctlError(f"--workers {spec!r} is not a worker list", "use all, 3, 0,3,5 or 0-3") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise TpuctlError(f"worker {bad[0]} does not exist", f"this TPU has workers 0-{count - 1}")
    return sorted(set(indices))


def _out() -> Any:
    return render.console()


def _err() -> Any:
    return render.console(stderr=True)


def _show(reports: list[WorkerReport], as_json: bool, table: Callable[[list[WorkerReport]], Any]) -> None:
    """Per-worker reports as JSON, or as a table followed by the failed workers and why (last, on stderr)."""
    if as_json:
        render.print_json([render.report_json(r) for r in reports])
        return
    _out().print(table(reports))
    _say_failures((r.index, r.ip, r.error) for r in reports)


def _say_failures(items: Iterable[tuple[int, str, str | None]]) -> None:
    """The workers that failed and why, one line each, last on stderr so they are what the user sees."""
    for line in render.failures((i, host, why) for i, host, why in items if why):
        _err().print(render.plain(line), style="red")


# --- settings and discovery ---------------------------------------------------------------------------------


@cli.group(name="config")
def config_group() -> None:
    """Show where tpuctl's settings come from."""


@config_group.command("show")
@fleet_options("remote_dir", "command_timeout")
@json_option
def config_show(as_json: bool, **flags: Any) -> None:
    """Print every resolved setting and where it came from (flag, env, profile, gcloud, default).

    Example: TPUCTL_ZONE=us-central2-b tpuctl config show
    """
    settings = _settings(flags)
    if as_json:
        render.print_json(render.settings_json(settings))
    else:
        _out().print(render.settings_table(settings))


@cli.command("list")
@setting_options("project", "zone", "internal_ip")
@json_option
def list_nodes(as_json: bool, **flags: Any) -> None:
    """List the TPUs in the zone: state, health, type, workers and their IPs.

    Example: tpuctl list --project my-proj --zone us-central2-b --json
    """
    from tpuctl.cloud import TpuApi

    settings = _settings(flags)
    nodes = TpuApi(settings).list_nodes()
    if as_json:
        render.print_json([n.to_json() for n in nodes])
    elif not nodes:
        _err().print(f"No TPUs in project {settings.project}, zone {settings.zone}.")
    else:
        _out().print(render.nodes_table(nodes, settings.internal_ip))


# --- running commands ---------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--worker", "-w", type=int, default=0, show_default=True, help="Worker index.")
@fleet_options()
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(worker: int, command: tuple[str, ...], **flags: Any) -> None:
    """Open a shell on one worker, or run CMD there (system ssh client).

    \b
    Examples:
      tpuctl ssh --worker 3
      tpuctl ssh -- 'tail -n 50 /tmp/tpu_logs/*.INFO'
    """
    from tpuctl import remote
    from tpuctl.ssh import KnownHosts, host_key_name, ssh_command

    settings = _settings(flags)
    node = _node(settings)
    index = parse_workers(str(worker), len(node.workers))[0]
    host = node.workers[index].address(settings.internal_ip)
    if shutil.which("ssh") is None:
        raise TpuctlError("ssh is not installed on this machine", "install openssh-client")
    if settings.replace_host_keys:
        KnownHosts(settings.path("known_hosts")).forget([host_key_name(host, settings.ssh_port)])
    argv = ssh_command(settings, host, interactive=not command)
    if command:
        argv.append(remote.user_command(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@cli.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--workers", default="all", show_default=True, help="Which workers: all, 3, 0,3,5 or 0-3.")
@click.option("--group", is_flag=True, help="Print each worker's output together, after it finishes.")
@fleet_options("command_timeout")
@dry_run_option
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(workers: str, group: bool, dry_run: bool, as_json: bool, command: tuple[str, ...], **flags: Any) -> None:
    """Run CMD on the workers in parallel; output prefixed [wN]; exit status is the worst worker's.

    One argument is a shell command line (quote it: pipes, $VARS work); several are words sent exactly as given.

    \b
    Examples:
      tpuctl exec -- 'python3 -c "import jax; print(jax.device_count())"'
      tpuctl exec --workers 0,3 -- ls -la /tmp/tpu_logs
    """
    from tpuctl import remote

    settings = _settings(flags)
    fleet = _fleet(settings, workers)
    if dry_run:
        _err().print(f"Would run on {render.count(len(fleet.hosts), 'worker')} ({', '.join(fleet.hosts)}):")
        click.echo(remote.user_command(command))
        return
    lock = threading.Lock()

    def stream(worker: Any, name: str, line: str) -> None:
        out = sys.stdout if name == "stdout" else sys.stderr
        with lock:
            out.write(f"[{render.worker_name(worker.index)}] {line}\n")
            out.flush()

    quiet = as_json or group
    results = fleet.run(remote.user_command(command), on_line=None if quiet else stream)
    if as_json:
        render.print_json({"workers": [render.result_json(r) for r in results]})
    elif group:
        for r in results:
            _err().print(render.plain(f"── {render.worker_name(r.worker.index)} {r.host}: {r.status}"), style="bold")
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            sys.stdout.flush()
    if not as_json:
        _err().print(render.results_table(results))
        _say_failures((r.worker.index, r.host, r.error) for r in results)
    raise SystemExit(exec_exit_code(results))


def exec_exit_code(results: list[WorkerResult]) -> int:
    """The worst worker's: 255 if any could not be reached or timed out, else the highest exit code."""
    if any(r.error is not None for r in results):
        return EXIT_UNREACHABLE
    return max((r.exit_code or 0 for r in results), default=0)


# --- code and environment -----------------------------------------------------------------------------------


@cli.command()
@click.argument("directory", default=".", type=click.Path(path_type=Path))
@click.option("--delete", is_flag=True, help="Remove files on the workers that DIR no longer has.")
@click.option("--exclude", multiple=True, metavar="PAT", help="Also skip files matching PAT (rsync pattern).")
@click.option("--full", is_flag=True, help="rsync every worker in full instead of applying the computed delta.")
@fleet_options("remote_dir", "command_timeout")
@dry_run_option
@json_option
def sync(
    directory: Path,
    delete: bool,
    exclude: tuple[str, ...],
    full: bool,
    dry_run: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Copy DIR (default .) to every worker's remote dir, incrementally, skipping .git and .gitignore'd files.

    \b
    Examples:
      tpuctl sync . --tpu my-pod
      tpuctl sync ~/code/openvision --remote-dir '~/openvision' --exclude '*.ckpt'
    """
    from tpuctl import sync as syncing

    settings = _settings(flags)
    src = directory.resolve()
    syncing.check_source(src)
    if dry_run:
        files = syncing.changed_files(src, settings, delete=delete, excludes=exclude)
        hosts = [w.address(settings.internal_ip) for w in _node(settings).workers]
        if as_json:
            render.print_json({"files": files, "workers": hosts})
        else:
            for f in files:
                click.echo(f)
            _err().print(
                f"Would send {render.count(len(files), 'changed file')} to {render.count(len(hosts), 'worker')}"
                f" ({settings.remote_dir})."
            )
        return
    results = _sync_to_workers(settings, src, delete=delete, excludes=exclude, full=full, progress=not as_json)
    if as_json:
        render.print_json([render.sync_json(r) for r in results])
    else:
        _out().print(render.sync_table(results))
        _say_failures((r.worker.index, r.host, r.error) for r in results)
        if all(r.ok for r in results):
            _err().print(
                f"Synced {src} to {settings.remote_dir} on {render.count(len(results), 'worker')}. Next: tpuctl prepare"
            )
    raise SystemExit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)


def _sync_to_workers(
    settings: Settings, src: Path, *, delete: bool, excludes: tuple[str, ...], full: bool, progress: bool
) -> list[Any]:
    from tpuctl import sync as syncing

    with syncing.Mirror(settings, src, delete=delete, excludes=excludes, full=full) as mirror:
        workers = _node(settings).workers  # looked up while the delta is computed (and applied where it can be)
        with _SyncProgress(len(workers), enabled=progress) as shown:
            return mirror.sync(workers, on_progress=shown)


class _SyncProgress:
    """A rich progress view with a row per worker, only on a terminal (rich is not even imported otherwise)."""

    def __init__(self, count: int, enabled: bool):
        self.progress = None
        console = render.console(stderr=True) if enabled and sys.stderr.isatty() else None
        if console is not None and console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn

            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[phase]}"))
            self.progress = Progress(*columns, console=console, transient=True)
        self.tasks: dict[int, Any] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> _SyncProgress:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, worker: Any, phase: str) -> None:
        if self.progress is None:
            return
        with self.lock:
            if worker.index not in self.tasks:
                name = render.worker_name(worker.index)
                self.tasks[worker.index] = self.progress.add_task(name, total=1, phase=phase)
            done = phase in ("done", "failed")
            self.progress.update(self.tasks[worker.index], phase=phase, completed=1 if done else 0)


@cli.command()
@fleet_options("remote_dir", "command_timeout")
@setting_options("python", "extras", "pip_args", "jax_version", "apt_packages")
@dry_run_option
@json_option
def prepare(dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Create REMOTE_DIR/.venv on every worker with the project and its extras, jax pinned (idempotent).

    Every worker gets jax==JAX_VERSION (jax[tpu] where it has TPU devices), so a pod never mixes releases; the
    APT_PACKAGES (comma-separated) are installed first with apt-get, as root or through sudo -n.

    Example: tpuctl sync . && tpuctl prepare --jax-version 0.4.35 --apt-packages libgl1,ffmpeg
    """
    from tpuctl import ops

    settings = _settings(flags)
    command = ops.prepare_command(settings)  # a missing pin is one line before any worker is asked
    fleet = _fleet(settings)
    if dry_run:
        plan = render.prepare_plan(settings.extras, settings.jax_version or "", settings.apt_packages)
        _err().print(render.plain(f"Would install {plan}"))
        _err().print(f"on {render.count(len(fleet.hosts), 'worker')} ({', '.join(fleet.hosts)}), by running:")
        click.echo(command)
        return
    reports = ops.prepare(settings, fleet)
    _show(reports, as_json, render.prepare_table)
    if not as_json and not any(r.error for r in reports):
        _err().print(
            f"{settings.remote_dir}/.venv is ready on {render.count(len(reports), 'worker')}. Next: tpuctl check"
        )
    raise SystemExit(EXIT_FAILED if any(r.error for r in reports) else EXIT_OK)


# --- the chips ----------------------------------------------------------------------------------------------


@cli.command()
@fleet_options()
@json_option
def check(as_json: bool, **flags: Any) -> None:
    """Who holds the TPU chips on each worker. Exit 0 all free, 1 any busy, 3 any unknown (unreachable).

    Example: tpuctl check --tpu my-pod --json
    """
    from tpuctl import ops

    settings = _settings(flags)
    reports = ops.check(settings, _fleet(settings))
    if as_json:  # the documented shape: worker, ip, state, holders (and error)
        render.print_json([render.check_json(r) for r in reports])
    else:
        _show(reports, False, render.check_table)
    raise SystemExit(ops.check_exit_code(reports))


@cli.command()
@click.option("--grace", type=float, default=KILL_GRACE_S, show_default=True, help="Seconds between TERM and KILL.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@fleet_options()
@dry_run_option
@json_option
def kill(grace: float, yes: bool, dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Stop the training job on every worker: tpuctl's tmux sessions, then the chip holders, then stale locks.

    Holders get TERM, then KILL after --grace seconds; lockfiles go only once nobody holds them.
    Never kills its own shell or sshd.

    Example: tpuctl kill --tpu my-pod --dry-run
    """
    from tpuctl import ops

    settings = _settings(flags)
    fleet = _fleet(settings)
    if not dry_run and not yes:
        _confirm_by_name(settings.tpu or "", f"kill the jobs on all {len(fleet.workers)} workers of")
    reports = ops.kill(settings, fleet, grace=grace, dry_run=dry_run)
    _show(reports, as_json, render.kill_table)
    if not as_json and not dry_run and not any(r.error for r in reports):
        _err().print("Stopped. Next: tpuctl check")
    failed = any(r.error or r.data.get("survivors") for r in reports)
    raise SystemExit(EXIT_FAILED if failed else EXIT_OK)


@cli.command("clean-logs")
@fleet_options()
@dry_run_option
@json_option
def clean_logs(dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Remove /tmp/tpu_logs, crash dumps and libtpu lockfiles nobody holds; report freed bytes per worker.

    Example: tpuctl clean-logs --tpu my-pod
    """
    from tpuctl import ops

    settings = _settings(flags)
    reports = ops.clean_logs(settings, _fleet(settings), dry_run=dry_run)
    _show(reports, as_json, render.clean_table)
    raise SystemExit(EXIT_FAILED if any(r.error for r in reports) else EXIT_OK)


@cli.command()
@click.pass_context
def menu(ctx: click.Context) -> None:
    """Interactive menu (replaces tpu_command.sh): pick the TPU, then list, ssh, sync, prepare, check, kill, clean
    logs, run, status, logs and stop until you exit. Needs a terminal; scripts use the subcommands."""
    from tpuctl import menu as menus

    menus.loop(ctx.find_root().obj["profile"])


def _confirm_by_name(name: str, action: str) -> None:
    if not sys.stdin.isatty():
        raise TpuctlError(f"refusing to {action} TPU {name!r} without confirmation", "add --yes (or use --dry-run)")
    import questionary

    typed = questionary.text(f"Type the TPU name to {action} it ({name}):").unsafe_ask()
    if typed.strip() != name:
        raise TpuctlError(f"confirmation {typed!r} does not match {name!r}; nothing was done")


def main() -> None:
    """Console entry point: user errors become one line and an exit code; tracebacks only with tpuctl's own -v (as
    click parsed it: a `-v` further on belongs to a command, e.g. `tpuctl exec -- grep -v x`)."""
    state: dict[str, Any] = {}
    try:
        cli.main(standalone_mode=False, prog_name="tpuctl", obj=state)
    except TpuctlError as e:
        if state.get("verbose"):
            raise
        click.echo(f"tpuctl: error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except click.exceptions.Abort:
        click.echo("tpuctl: aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        click.echo("tpuctl: interrupted", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:
        if state.get("verbose"):
            raise
        click.echo(f"tpuctl: internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)", err=True)
        raise SystemExit(EXIT_FAILED) from None


# The training-run commands (run, status, logs, stop, attach, runs) and the TPU lifecycle ones (create, delete,
# describe) live in their own modules; importing them registers them on `cli`.
from tpuctl import cli_lifecycle, cli_runs  # noqa: E402, F401

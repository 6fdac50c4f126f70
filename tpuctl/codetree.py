"""Which code a run trains with: the content manifest of the tree a sync sent (from the local mirror, not the
workers), its hash, the local checkout's git commit, and each worker's own answer to "do you hold exactly these
files?" (GNU sha256sum on the worker, checking the manifest sent on stdin: nothing to install, one read of the tree).

The tree hash is the SHA-256 of the manifest in sha256sum's format (`HASH  PATH` per regular file, sorted by path,
then `-> TARGET  PATH` per symbolic link): anyone can recompute it with `sha256sum` over a copy of the tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHORT = 12  # hex digits of a tree hash shown in tables and lines (the records keep all 64)


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]  # relative path -> sha256 hex of the content, regular files
    links: dict[str, str] = field(default_factory=dict)  # relative path -> link target

    @property
    def tree_hash(self) -> str:
        lines = [f"{digest}  {_escaped(path)}\n" for path, digest in sorted(self.files.items())]
        lines += [f"-> {target}  {_escaped(path)}\n" for path, target in sorted(self.links.items())]
        return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()

    def check_input(self) -> bytes:
        """The manifest as `sha256sum --check` reads it (regular files; a link is followed there, so not listed)."""
        lines = (_check_line(path, digest) for path, digest in sorted(self.files.items()))
        return "".join(lines).encode("utf-8", "surrogateescape")


def _escaped(path: str) -> str:
    return path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _check_line(path: str, digest: str) -> str:
    """GNU's format: a name holding a backslash or a line break is escaped, and its line starts with a backslash."""
    escaped = _escaped(path)
    mark = "\\" if escaped != path else ""
    return f"{mark}{digest}  {escaped}\n"


def _unescaped(name: str) -> str:
    out, chars = [], iter(name)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


def parse_check_output(stdout: str) -> list[str]:
    """The paths `sha256sum --quiet --check` reports as differing or unreadable (missing), in its order."""
    paths = []
    for line in stdout.splitlines():
        name, sep, verdict = line.rpartition(": ")
        if not sep or not verdict.startswith("FAILED"):
            continue
        paths.append(_unescaped(name[1:]) if name.startswith("\\") else name)
    return paths


def _walk(root: Path, prefix: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), path + "/")
            else:
                yield path, entry


def _listed(root: Path, paths: list[str]) -> Iterator[tuple[str, os.DirEntry[str] | Path]]:
    for path in sorted(paths):
        yield path, root / path


def manifest(root: Path, cache_file: Path | None = None, paths: list[str] | None = None) -> Manifest:
    """The manifest of every regular file and link under `root` (or of `paths`, relative to it).

    `cache_file` keeps each file's digest by (inode, size, mtime in ns): rsync replaces a file it updates (a new inode),
    so in the sync mirror an unchanged key is an unchanged file and only what a sync wrote is read again.
    """
    cached: dict[str, list[Any]] = {}
    if cache_file is not None and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except ValueError:
            cached = {}
    files, links, keep = {}, {}, {}
    entries = _walk(root) if paths is None else _listed(root, paths)
    for path, entry in entries:
        if entry.is_symlink():
            links[path] = os.readlink(entry)
            continue
        if not entry.is_file(follow_symlinks=False) if isinstance(entry, os.DirEntry) else not entry.is_file():
            continue  # directories in a listing, sockets, fifos: nothing a sync sends
        stat = entry.stat(follow_symlinks=False)
        key = [stat.st_ino, stat.st_size, stat.st_mtime_ns]
        hit = cached.get(path)
        digest = hit[3] if hit is not None and hit[:3] == key else _sha256(os.fspath(entry))
        files[path] = digest
        keep[path] = [*key, digest]
    if cache_file is not None:
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(keep))
        tmp.replace(cache_file)
    return Manifest(files, links)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout `directory` is in; (None, None) outside one or without git. Dirty: a
    tracked file changed or an untracked one that .gitignore does not hide (either travels with a sync)."""
    head = _git(directory, "rev-parse", "--verify", "-q", "HEAD")
    if head is None or head.returncode != 0:
        return None, None
    status = _git(directory, "status", "--porcelain", "--", ".")
    if status is None:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def _git(directory: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """`git -C directory ARGS`; None without git or when it hangs."""
    try:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class CodeIdentity:
    """What a run records about its code: the tree hash the workers were checked against (None where tpuctl did not
    sync them), and the local checkout's commit and dirty flag."""

    tree: str | None
    commit: str | None = None
    dirty: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"tree": self.tree, "commit": self.commit, "dirty": self.dirty}

    @classmethod
    def of(cls, tree: str | None, directory: Path) -> CodeIdentity:
        commit, dirty = git_state(directory)
        return cls(tree, commit, dirty)


def describe(code: dict[str, Any] | None) -> str:
    """One line for people: 'tree 3f2a9c1d0b7e, git 1a2b3c4d5e6f (dirty)'."""
    if not code:
        return "code not recorded"
    tree = f"tree {code['tree'][:SHORT]}" if code.get("tree") else "tree unknown (not synced by tpuctl)"
    git = f"git {code['commit'][:SHORT]}{' (dirty)' if code.get('dirty') else ''}" if code.get("commit") else "no git"
    differ = code.get("workers_differ") or {}
    forced = f"; started with --force although {', '.join(sorted(differ))} held other code" if differ else ""
    return f"{tree}, {git}{forced}"


@dataclass
class TreeCheck:
    """One worker's answer: the manifest's paths it holds with other content or not at all (`differ`), the paths it
    holds that the sync would not have left there (`extra`, from --verify only), or why it could not be asked."""

    index: int
    host: str
    differ: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def state(self) -> str:
        if self.error is not None:
            return "unknown"
        return "differs" if self.differ or self.extra else "same"


NO_TREE = 97  # remote.check_tree_command's exit when the synced directory is not there at all


def check_workers(fleet: Any, remote_dir: str, expected: Manifest, timeout: float) -> list[TreeCheck]:
    """Ask every worker of `fleet` (tpuctl.fleet.Fleet) whether it holds `expected`'s files, by content."""
    from tpuctl import remote

    checks = []
    stdin = expected.check_input()
    results = fleet.run(remote.check_tree_command(remote_dir), timeout=timeout, stdin=stdin) if stdin else []
    for r in results:
        check = TreeCheck(r.worker.index, r.host)
        if r.error is not None:
            check.error = r.error
        elif r.exit_code == NO_TREE:
            check.differ = sorted(expected.files)
        elif r.exit_code not in (0, 1) or (r.exit_code == 1 and not parse_check_output(r.stdout)):
            detail = (r.stderr.strip().splitlines() or [f"exit {r.exit_code}"])[-1]
            check.error = f"could not check the synced files: {detail}"
        else:
            check.differ = parse_check_output(r.stdout)
        checks.append(check)
    return checks


def first_difference(check: TreeCheck) -> str:
    """'pkg/mod.py differs (and 2 more)' for a worker whose tree is not the one synced."""
    if check.differ:
        what = f"{check.differ[0]} differs from what the last sync sent"
    else:
        what = f"{check.extra[0]} is on the worker but not in what the last sync sent"
    more = len(check.differ) + len(check.extra) - 1
    return what + (f" (and {more} more)" if more else "")

"""What a pod run will read from Cloud Storage, checked from this machine before anything starts: the recipe's gs://
data, vocab, eval files and converted checkpoints, and the bucket its workdir is in (google-cloud-storage, with your
credentials). A bucket not made yet, a glob that matches nothing or a file not copied up is one message here, all of
them at once, instead of the trainer's error on every worker after the sync, the prepare and the start.

The trainer checks the same again on the workers (trainer/preflight.py), as their service account. Paths that are
not gs:// are left to it: they are on the workers' disks, which only the workers see. `check_paths = false`
(`--no-check-paths`) skips this where your account may not read what the TPU VMs' service account can.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpuctl.errors import TpuctlError
from trainer.recipe import CONVERTED_SETTINGS, TFDS_INFO, RecipeError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from trainer.recipe import Recipe, Source

WILDCARD = re.compile(r"[*?\[]")
LIST_LIMIT = 20_000  # objects looked at for one glob before its match is left to the trainer's own check


@dataclass(frozen=True)
class Problem:
    key: str  # the recipe key, or "workdir"
    message: str  # `key = "value" ...`: what is wrong, as the trainer would say it
    denied: bool = False  # your credentials may not read it (the workers' may)


def check(settings: Settings, recipe: Recipe, workdir: str) -> None:
    """Nothing when every gs:// path the run reads can be read, and its workdir's bucket exists; else a TpuctlError
    naming every problem (the first in full)."""
    if not settings.check_paths:
        return
    found = problems(settings, recipe, workdir)
    if not found:
        return
    more = f" (and {len(found) - 1} more: {', '.join(p.key for p in found[1:4])})" if len(found) > 1 else ""
    if any(p.denied for p in found):
        fix = (
            "grant your account read access to the bucket (roles/storage.objectViewer), or --no-check-paths where"
            " only the TPU VMs' service account may read it"
        )
    else:
        fix = "copy the files there, or fix the path in the recipe (or --set KEY=gs://...)"
    raise TpuctlError(found[0].message + more, fix)


def problems(settings: Settings, recipe: Recipe, workdir: str) -> list[Problem]:
    """Every gs:// path of the run that cannot be read, in the recipe's order, the workdir's bucket first."""
    wanted = [("workdir", workdir, "bucket")] if workdir.startswith("gs://") else []
    for key, value, kind in recipe.named_paths():
        parts = [p.strip() for p in value.split(",")] if kind == "glob" else [value]
        wanted += [(key, part, kind) for part in parts if part.startswith("gs://")]
    if not wanted:
        return []
    store = Store(settings)
    sources = {s.key("train"): s for s in recipe.data.sources()}
    found = []
    for key, path, kind in wanted:
        problem = store.check(key, path, kind, sources.get(key))
        if problem:
            found.append(problem)
    return found


class Store:
    """Cloud Storage, as your credentials see it: each check one listing or one read."""

    def __init__(self, settings: Settings):
        # The client would look up each bucket's metadata again in a thread of its own, for tracing spans tpuctl
        # does not make: a second request per bucket, racing the first
        os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
        from google.cloud import storage  # type: ignore[attr-defined]
        from google.cloud.storage.retry import DEFAULT_RETRY

        from tpuctl.cloud import credentials_for

        self.endpoint, self.timeout = settings.storage_endpoint, settings.api_timeout
        self.retry = DEFAULT_RETRY.with_deadline(self.timeout)  # transient failures retried, all within api_timeout
        self._client = storage.Client(
            project=settings.project or "-",  # listing and reading objects bills the bucket's project, not this one
            credentials=credentials_for(self.endpoint),
            client_options={"api_endpoint": self.endpoint},
        )

    def check(self, key: str, path: str, kind: str, source: Source | None) -> Problem | None:
        from google.api_core import exceptions

        bucket, _, name = path[len("gs://") :].partition("/")
        said = f'{key} = "{path}"' if key != "workdir" else f"the workdir {path}"
        try:
            if kind == "bucket":
                self._names(bucket, "", 1)  # a missing bucket is a NotFound, an empty one is fine
                return None
            if kind == "glob" and WILDCARD.search(name):
                return None if self._glob_matches(bucket, name) else Problem(key, f"{said} matches no files")
            if kind == "tfds" and source is not None:
                text = self._read(bucket, f"{name.rstrip('/')}/{TFDS_INFO}")
                if text is None:
                    return Problem(key, f"{said} is not a TFDS builder directory (it has no {TFDS_INFO})")
                try:
                    source.check_tfds_info(text)
                except RecipeError as error:
                    return Problem(key, str(error))
                return None
            if kind == "converted":
                if self._exists(bucket, f"{name.rstrip('/')}/{CONVERTED_SETTINGS}"):
                    return None
                return Problem(key, f"{said} is not a converted checkpoint (no {CONVERTED_SETTINGS})")
            return None if self._exists(bucket, name) else Problem(key, f"{said} does not exist")
        except exceptions.NotFound:  # a listing's 404: the bucket itself
            return Problem(key, f"{said}: bucket gs://{bucket} does not exist")
        except exceptions.Forbidden as error:
            return Problem(key, f"{said} cannot be read with your credentials ({_message(error)})", denied=True)
        except exceptions.GoogleAPICallError as error:
            return Problem(key, f"{said} cannot be read: Cloud Storage answered {error.code} ({_message(error)})")
        except (OSError, exceptions.RetryError) as error:  # requests' connection errors are OSErrors
            raise TpuctlError(
                f"cannot reach Cloud Storage at {self.endpoint} to check {said} ({type(error).__name__})",
                "check the network, or --no-check-paths to start without checking",
            ) from None

    def _names(self, bucket: str, prefix: str, limit: int) -> list[str]:
        blobs = self._client.list_blobs(
            bucket, prefix=prefix, max_results=limit, timeout=self.timeout, retry=self.retry
        )
        return [blob.name for blob in blobs]

    def _exists(self, bucket: str, name: str) -> bool:
        # a listing, not a metadata read: a missing bucket is then a NotFound of its own, not a missing object
        return name in self._names(bucket, name, 1)

    def _read(self, bucket: str, name: str) -> str | None:
        if not self._exists(bucket, name):
            return None
        data: bytes = self._client.bucket(bucket).blob(name).download_as_bytes(timeout=self.timeout, retry=self.retry)
        return data.decode("utf-8", "replace")

    def _glob_matches(self, bucket: str, pattern: str) -> bool:
        """Whether an object matches `pattern` as the trainer's glob reads it (`*` within a path segment, `**`
        across segments); past LIST_LIMIT objects without one, left to the trainer (True)."""
        segments = pattern.split("/")
        first = next(i for i, part in enumerate(segments) if WILDCARD.search(part))
        prefix = "/".join(segments[:first]) + "/" if first else ""
        seen = 0
        for name in self._names(bucket, prefix, LIST_LIMIT):
            seen += 1
            if _match(segments, name.split("/")):
                return True
        return seen >= LIST_LIMIT


def _match(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match(rest, name[1:])


def _message(error: Any) -> str:
    """Cloud Storage's own words: api_core puts the request ("GET https://...: ") before them."""
    text = re.sub(r"^[A-Z]+ \S+: ", "", str(getattr(error, "message", "") or error).strip()).splitlines()
    return (text[0] if text else type(error).__name__)[:200]

"""The project's Compute Engine metadata (google-cloud-compute): what a TPU VM inherits besides its node's own, such
as `enable-oslogin`, which organisations often set project-wide rather than per VM.

Read only, only where the node's own metadata does not decide (tpuctl.access), and remembered for a day: even its
projects service alone takes half a second to import.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.errors import CloudError

if TYPE_CHECKING:
    from tpuctl.config import Settings


def project_metadata(settings: Settings) -> dict[str, str]:
    """The project's common instance metadata, key -> value; a CloudError saying why it cannot be read."""
    from google.api_core import exceptions
    from google.api_core.client_options import ClientOptions

    from tpuctl.cloud import api_message, credentials_for
    from tpuctl.imports import import_past_init

    # the projects service alone: the package's __init__ imports all of Compute Engine's (~1 s more)
    ProjectsClient = import_past_init("google.cloud.compute_v1", "services.projects").ProjectsClient

    settings.require("project")
    doing = f"reading project {settings.project}'s Compute Engine metadata"
    client = ProjectsClient(
        credentials=credentials_for(settings.compute_endpoint),
        transport="rest",
        client_options=ClientOptions(api_endpoint=settings.compute_endpoint),
    )
    try:
        project = client.get(project=settings.project, timeout=settings.api_timeout)
    except exceptions.Forbidden as e:
        raise CloudError(
            f"{doing}: permission denied, your account lacks compute.projects.get ({api_message(e.message)})",
            "set ssh_keys = oslogin or ssh_keys = metadata to say which the project uses",
        ) from None
    except exceptions.GoogleAPICallError as e:
        raise CloudError(f"{doing}: the Compute Engine API answered {e.code}: {api_message(e.message)}") from None
    except OSError as e:
        raise CloudError(f"{doing}: cannot reach the Compute Engine API at {settings.compute_endpoint} ({e})") from None
    return {item.key: item.value for item in project.common_instance_metadata.items}


def project_oslogin(settings: Settings) -> bool | None:
    """Whether the project's metadata turns OS Login on (True), off (False) or says nothing (None). Remembered for a
    day per project (XDG cache): it changes rarely, and the lookup costs a second."""
    from tpuctl.access import metadata_flag

    cache = _cache_path(settings)
    try:
        raw = json.loads(cache.read_text())
        if 0 <= time.time() - raw["saved"] < PROJECT_CACHE_S:
            return raw["enable_oslogin"] if isinstance(raw["enable_oslogin"], bool) else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    answer = metadata_flag(project_metadata(settings).get("enable-oslogin"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"saved": time.time(), "enable_oslogin": answer}))
    os.replace(tmp, cache)
    return answer


PROJECT_CACHE_S = 86400.0


def _cache_path(settings: Settings) -> Path:
    key = f"{settings.compute_endpoint}|{settings.project}"
    root = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    return root / "tpuctl" / "projects" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

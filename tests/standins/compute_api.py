"""A local Compute Engine API (v1) for the one call tpuctl makes there: `GET compute/v1/projects/{project}`, whose
`commonInstanceMetadata` holds what every VM of the project inherits (`enable-oslogin`, project-wide ssh-keys).
Its answers are held to compute.v1.json by the tests. A project not in `projects` is 404; one in `denied` is 403
(the caller lacks compute.projects.get), as a TPU user without a Compute Engine role meets."""

from __future__ import annotations

import hashlib
import json
from http import HTTPStatus
from typing import Any

from standins.jsonapi import ApiError, JsonApi

SERVICE_PATH = "/compute/v1"  # the document's servicePath: its method paths start after it


class FakeComputeApi(JsonApi):
    def __init__(self) -> None:
        super().__init__()
        self.projects: dict[str, dict[str, str]] = {}  # project -> its common instance metadata
        self.denied: set[str] = set()

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        match method, path.removeprefix(SERVICE_PATH).strip("/").split("/"):
            case "GET", ["projects", project]:
                if project in self.denied:
                    raise ApiError(
                        HTTPStatus.FORBIDDEN,
                        f"Required 'compute.projects.get' permission for 'projects/{project}'",
                    )
                with self._lock:
                    metadata = self.projects.get(project)
                if metadata is None:
                    raise ApiError(HTTPStatus.NOT_FOUND, f"The resource 'projects/{project}' was not found")
                items = [{"key": k, "value": v} for k, v in metadata.items()]
                fingerprint = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:12]
                return {
                    "kind": "compute#project",
                    "id": str(int(hashlib.sha256(project.encode()).hexdigest()[:12], 16)),
                    "name": project,
                    "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}",
                    "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": fingerprint, "items": items},
                }
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")

"""A local OS Login API (v1): the two methods gcloud, and so tpuctl, use to log in to a VM of an OS Login project.

`GET v1/users/{user}/loginProfile` and `POST v1/users/{user}:importSshPublicKey`, with the REST shapes of Google's
discovery document (oslogin.v1.json; the tests hold every answer to it, as the Cloud TPU stand-in's). The real
service makes a user's POSIX account for a project when a key is imported with that project's id; until then the
profile has no POSIX account there, which is what a first-day user meets. Profiles are per account (the email);
`denied` accounts get 403, as a caller whose credentials are another account's would.
"""

from __future__ import annotations

import hashlib
import re
from http import HTTPStatus
from typing import Any

from standins.jsonapi import ApiError, JsonApi

LINUX = 1  # PosixAccount.operatingSystemType LINUX, as the REST client asks enums (enum-encoding=int)


def posix_name(email: str) -> str:
    """The POSIX user name OS Login gives an account: the email with every character but [a-z0-9_] as '_'."""
    return re.sub(r"[^a-z0-9_]", "_", email.lower())


class FakeOsLoginApi(JsonApi):
    def __init__(self) -> None:
        super().__init__()
        self.profiles: dict[str, dict[str, Any]] = {}  # email -> {"keys": {fingerprint: key}, "projects": set()}
        self.denied: set[str] = set()

    def keys_of_user(self, username: str) -> list[str]:
        """The keys sshd accepts for POSIX user `username` (what a VM's `google_authorized_keys` asks for)."""
        with self._lock:
            for email, profile in self.profiles.items():
                if posix_name(email) == username and profile["projects"]:
                    return list(profile["keys"].values())
        return []

    # -- routes ------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        match method, path.strip("/").split("/"):
            case "GET", ["v1", "users", email, "loginProfile"]:
                return self._profile_json(self._account(email), query.get("projectId", [""])[0])
            case "POST", ["v1", "users", user_import]:
                email, sep, verb = user_import.rpartition(":")
                if sep and verb == "importSshPublicKey":
                    return self._import(self._account(email), body, query.get("projectId", [""])[0])
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")

    def _account(self, email: str) -> str:
        if email in self.denied:
            raise ApiError(HTTPStatus.FORBIDDEN, f"The caller does not have permission to access users/{email}")
        return email

    def _import(self, email: str, body: dict[str, Any], project: str) -> dict[str, Any]:
        key = str(body.get("key", "")).strip()
        if len(key.split()) < 2:
            raise ApiError(HTTPStatus.BAD_REQUEST, "Invalid SSH key")
        with self._lock:
            profile = self.profiles.setdefault(email, {"keys": {}, "projects": set()})
            profile["keys"][hashlib.sha256(key.encode()).hexdigest()] = key
            if project:
                profile["projects"].add(project)
        return {"loginProfile": self._profile_json(email, project)}

    def _profile_json(self, email: str, project: str) -> dict[str, Any]:
        with self._lock:
            profile = self.profiles.get(email, {"keys": {}, "projects": set()})
            keys = {
                fingerprint: {
                    "key": key,
                    "fingerprint": fingerprint,
                    "name": f"users/{email}/sshPublicKeys/{fingerprint}",
                }
                for fingerprint, key in profile["keys"].items()
            }
            accounts = [
                {
                    "primary": True,
                    "username": posix_name(email),
                    "uid": str(1000 + int(hashlib.sha256(email.encode()).hexdigest()[:6], 16) % 60000),
                    "gid": "1000",
                    "homeDirectory": f"/home/{posix_name(email)}",
                    "shell": "/bin/bash",
                    "accountId": project,
                    "operatingSystemType": LINUX,
                    "name": f"users/{email}/projects/{project}",
                }
                for project in sorted(profile["projects"])
                if project
            ]
        return {"name": email, "posixAccounts": accounts, "sshPublicKeys": keys}

"""The caller's OS Login profile (google-cloud-os-login): tpuctl's key in it, and the POSIX user it logs in as.

On a project with OS Login the VMs ignore ssh-keys metadata: sshd asks OS Login for the keys of the profile whose
POSIX user name is logging in (`jane_example_com` for jane@example.com). gcloud imports its key into the profile and
logs in as that name; so does tpuctl.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tpuctl.errors import CloudError, ConfigError

if TYPE_CHECKING:
    from tpuctl.config import Settings


class OsLogin:
    def __init__(self, settings: Settings):
        from google.api_core.client_options import ClientOptions
        from google.cloud import oslogin_v1

        from tpuctl.cloud import credentials_for

        settings.require("project")
        self.project, self.endpoint = settings.project, settings.oslogin_endpoint
        credentials = credentials_for(self.endpoint)
        self.account = settings.account or getattr(credentials, "service_account_email", None)
        if not self.account or "@" not in self.account:
            raise ConfigError(
                "OS Login needs your Google account, and it is not set",
                "set account (TPUCTL_ACCOUNT, or `gcloud config set account you@example.com`)",
            )
        self._timeout = settings.api_timeout
        self._client = oslogin_v1.OsLoginServiceClient(
            credentials=credentials, transport="rest", client_options=ClientOptions(api_endpoint=self.endpoint)
        )

    def login_user(self, public: str) -> str | None:
        """The POSIX user name that logs in with `public`, where the profile holds it (a read, nothing changed)."""
        profile = self._profile()
        if not _holds(profile, public) or not list(profile.posix_accounts):
            return None
        return self._user(profile)

    def _profile(self) -> Any:
        return self._call(
            "reading",
            lambda: self._client.get_login_profile(
                request={"name": f"users/{self.account}", "project_id": self.project}, timeout=self._timeout
            ),
        )

    def authorize(self, public: str) -> tuple[str, bool]:
        """The POSIX user name that logs in with `public` (`type base64`), and whether the key was imported now (it
        was not in the profile, or the profile had no POSIX account in this project yet: importing with the
        project's id makes one)."""
        from google.cloud.oslogin_v1 import common

        profile = self._profile()
        if _holds(profile, public) and list(profile.posix_accounts):
            return self._user(profile), False
        answer = self._call(
            "adding your SSH key to",
            lambda: self._client.import_ssh_public_key(
                parent=f"users/{self.account}",
                ssh_public_key=common.SshPublicKey(key=public),
                project_id=self.project,
                timeout=self._timeout,
            ),
        )
        return self._user(answer.login_profile), True

    def _user(self, profile: Any) -> str:
        accounts = list(profile.posix_accounts)
        chosen = next((a for a in accounts if a.primary), accounts[0] if accounts else None)
        if chosen is None or not chosen.username:
            raise CloudError(
                f"the OS Login profile of {self.account} has no POSIX account in project {self.project}",
                f"ask for roles/compute.osLogin on project {self.project}, then run the command again",
            )
        return str(chosen.username)

    def _call(self, doing: str, call: Any) -> Any:
        from google.api_core import exceptions

        what = f"{doing} the OS Login profile of {self.account}"
        try:
            return call()
        except exceptions.GoogleAPICallError as e:
            reason = getattr(e, "reason", None)
            message = e.message
            if reason == "SERVICE_DISABLED":
                raise CloudError(
                    f"{what}: the OS Login API is not enabled in project {self.project}",
                    f"enable it: gcloud services enable oslogin.googleapis.com --project {self.project}",
                ) from None
            if isinstance(e, exceptions.Forbidden | exceptions.Unauthorized):
                raise CloudError(
                    f"{what}: permission denied ({message})",
                    f"run `gcloud auth application-default login` as {self.account}, or set account to the account"
                    " of your credentials",
                ) from None
            raise CloudError(f"{what}: the OS Login API answered {e.code}: {message}") from None
        except OSError as e:
            raise CloudError(f"{what}: cannot reach the OS Login API at {self.endpoint} ({e})") from None


def _holds(profile: Any, public: str) -> bool:
    """Whether the profile has the key `public` (`type base64`), whatever its comment."""
    want = public.split()[:2]
    return any(k.key.split()[:2] == want for k in profile.ssh_public_keys.values())

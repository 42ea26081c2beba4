"""The [security] section (TLS and the shared token) with its own checks.

The checks read the files the section names (certificates, key, token file) so a mistake is
refused at load time, naming the field, instead of as a handshake failure in a service log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from redheart.config.errors import Fail

# Values never shown in error messages and replaced by REDACTED wherever the configuration is written
# out (the run directory's config.toml, report.json, checkpoint manifests).
SECRET_KEYS: frozenset[tuple[str, str]] = frozenset({("security", "token")})
REDACTED = "<redacted>"


@dataclass
class SecurityConfig:
    tls_cert: str = ""
    """This process's certificate chain (PEM). Servers present it; with require_client_cert, clients present it too. Empty: no TLS (plaintext, as on loopback). Relative paths (here and below) are relative to the working directory. See docs/security.md."""
    tls_key: str = ""
    """Unencrypted PEM private key of tls_cert; keep it readable by the service's user only (chmod 600)."""
    tls_ca: str = ""
    """CA bundle (PEM) that signed the peers' certificates: clients verify servers with it and, with require_client_cert, servers verify clients. Setting it alone makes a client-only TLS config (e.g. the orchestrator in remote mode)."""
    require_client_cert: bool = False
    """Mutual TLS: servers refuse clients without a certificate signed by tls_ca (needs tls_cert, tls_key and tls_ca on every process)."""
    tls_server_name: str = ""
    """Name to check in the server certificate instead of the host of the address, e.g. when connecting by IP to a certificate issued for a hostname (empty: the address's host)."""
    token: str = field(default="", repr=False)
    """Shared secret every call must carry as `authorization: Bearer <token>` (empty: off); compared in constant time, never logged or written to the run directory. Prefer token_file or the REDHEART_SECURITY__TOKEN environment variable to writing it here or in --set (visible in `ps`). The gRPC health service is exempt."""
    token_file: str = ""
    """Read the token from this file (surrounding whitespace stripped) instead of `token`; either, not both."""

    @property
    def tls_enabled(self) -> bool:
        """Clients use TLS when a CA or a certificate is configured; servers need tls_cert and tls_key."""
        return bool(self.tls_cert or self.tls_ca)

    def resolved_token(self) -> str:
        """The shared token (from `token` or `token_file`), or "" when token authentication is off."""
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        return ""

    def describe(self) -> str:
        """A log-safe summary of the mode, e.g. "mTLS + token" (never the token itself)."""
        parts = []
        if self.tls_enabled:
            parts.append("mTLS" if self.require_client_cert else "TLS")
        else:
            parts.append("plaintext")
        if self.token or self.token_file:
            parts.append("token")
        return " + ".join(parts)

    def check(self, fail: Fail) -> None:
        """This section's own rules: readable PEM files, cert and key together, mTLS needs, the token."""
        for key, what, marker in (
            ("tls_cert", "certificate", "CERTIFICATE"),
            ("tls_key", "private key", "PRIVATE KEY"),
            ("tls_ca", "CA certificate bundle", "CERTIFICATE"),
            ("token_file", "token file", ""),
        ):
            path = getattr(self, key)
            if path:
                problem = _check_pem_file(path, what, marker)
                if problem:
                    fail("security", key, f"security.{key}: {problem}")
        if bool(self.tls_cert) != bool(self.tls_key):
            have, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            fail(
                "security",
                have,
                f"security.{have} is set but security.{missing} is not "
                "(fix: set both, the certificate and its private key)",
            )
        if self.require_client_cert:
            if not self.tls_ca:
                fail(
                    "security",
                    "require_client_cert",
                    "security.require_client_cert = true needs security.tls_ca, "
                    "the CA that signed the client certificates (fix: set tls_ca)",
                )
            if not self.tls_cert:
                fail(
                    "security",
                    "require_client_cert",
                    "security.require_client_cert = true needs security.tls_cert and "
                    "security.tls_key: every process presents its certificate (fix: set both)",
                )
        if self.tls_server_name and not self.tls_enabled:
            fail(
                "security",
                "tls_server_name",
                "security.tls_server_name is only used with TLS "
                "(fix: set security.tls_ca / tls_cert, or remove tls_server_name)",
            )
        self._check_token(fail)

    def _check_token(self, fail: Fail) -> None:
        if self.token and self.token_file:
            fail("security", "token", "security.token and security.token_file are both set (fix: keep one)")
        if self.token:
            if self.token == REDACTED:
                fail(
                    "security",
                    "token",
                    f'security.token is "{REDACTED}": this file is a written-out copy that never '
                    "stores the token (fix: pass it with REDHEART_SECURITY__TOKEN or security.token_file)",
                )
            problem = _check_token_text(self.token)
            if problem:
                fail("security", "token", f"security.token {problem}")
        elif self.token_file:
            try:
                problem = _check_token_text(self.resolved_token())
            except (OSError, UnicodeDecodeError) as exc:
                problem = f"cannot be read as text ({type(exc).__name__})"
            if problem:
                fail(
                    "security",
                    "token_file",
                    f"the token in security.token_file {self.token_file!r} {problem}",
                )


_TOKEN_HINT = "(fix: use printable ASCII without spaces, e.g. the output of `openssl rand -hex 32`)"


def _check_token_text(token: str) -> str | None:
    """Why a token cannot be used (it must travel in an HTTP/2 header), or None. Never quotes it."""
    if not token:
        return "is empty"
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        return f"contains spaces, control or non-ASCII characters {_TOKEN_HINT}"
    return None


def _check_pem_file(path: str, what: str, marker: str) -> str | None:
    """Why `path` cannot be used as a PEM `what` (missing, unreadable, wrong content), or None."""
    p = Path(path)
    if not p.exists():
        return f"file {path!r} does not exist"
    if not p.is_file():
        return f"{path!r} is not a file"
    try:
        text = p.read_bytes()
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if not marker:
        return None
    # "-----BEGIN CERTIFICATE-----"; keys: "-----BEGIN [RSA |EC |ENCRYPTED ]PRIVATE KEY-----".
    if f"{marker}-----".encode() not in text or b"-----BEGIN " not in text:
        return f"{path!r} is not a PEM {what} (no '-----BEGIN ...{marker}-----' line)"
    if marker == "PRIVATE KEY" and b"ENCRYPTED" in text:
        return (
            f"{path!r} is an encrypted private key; gRPC needs it unencrypted "
            f"(fix: `openssl pkey -in {path} -out key.pem`, then chmod 600 key.pem)"
        )
    return None

"""[security] in the config: defaults, errors naming file:line and the fix, the token never shown."""

from __future__ import annotations

import subprocess

import pytest
from pki import OPENSSL
from security_support import (
    needs_openssl,
    stage_config,
    write,
)

from cpu_stage.server import create_server as cpu_server
from redheart.config import REDACTED, ConfigError, HybridConfig, load_config

pytest_plugins = ["security_support"]  # its fixtures: pki, secure_regret

pytestmark = needs_openssl


# ----------------------------------------------------------------------------- config


def test_security_defaults_are_off():
    s = HybridConfig().security
    assert not s.tls_enabled and s.resolved_token() == "" and s.describe() == "plaintext"


@pytest.mark.parametrize(
    "body, needle, line",
    [
        ('tls_key = "{key}"', "security.tls_key is set but security.tls_cert is not", 3),
        ('tls_cert = "{cert}"', "security.tls_cert is set but security.tls_key is not", 3),
        (
            'tls_cert = "{cert}"\ntls_key = "{key}"\nrequire_client_cert = true',
            "require_client_cert = true needs security.tls_ca",
            5,
        ),
        (
            'tls_cert = "/nonexistent/cert.pem"',
            "security.tls_cert: file '/nonexistent/cert.pem' does not exist",
            3,
        ),
        ('tls_cert = "{key}"\ntls_key = "{key}"', "is not a PEM certificate", 3),
        ('tls_cert = "{cert}"\ntls_key = "{cert}"', "is not a PEM private key", 4),
        ('tls_server_name = "localhost"', "tls_server_name is only used with TLS", 3),
        ('token = "abc"\ntoken_file = "{token}"', "security.token and security.token_file are both set", 3),
        ('token = "has space"', "contains spaces", 3),
        (
            'token_file = "/nonexistent/token"',
            "security.token_file: file '/nonexistent/token' does not exist",
            3,
        ),
    ],
)
def test_security_config_errors_name_file_line_and_fix(tmp_path, pki, body, needle, line):
    body = body.format(cert=pki.server_cert, key=pki.server_key, token=pki.token_file)
    p = write(tmp_path, "[model]\n[security]\n" + body + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert f"{p}:{line}" in str(err.value) and needle in str(err.value)


def test_tls_ca_alone_is_a_client_config_refused_for_local_launch(tmp_path, pki):
    p = write(tmp_path, f'[security]\ntls_ca = "{pki.ca}"\n')
    with pytest.raises(
        ConfigError, match='launch.mode = "local" starts the services, which need security.tls_cert'
    ):
        load_config(p, env={})
    cfg = load_config(p, env={}, overrides=['launch.mode="remote"', "cpu_stage.port=1", "gpu_stage.port=2"])
    assert cfg.security.tls_enabled
    with pytest.raises(ConfigError, match="a server needs security.tls_cert"):
        cpu_server(stage_config({"tls_ca": str(pki.ca)}, launch={"mode": "remote"}), host="127.0.0.1", port=0)


def test_encrypted_key_is_refused(tmp_path, pki):
    enc = tmp_path / "enc.key"
    subprocess.run(
        [OPENSSL, "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:pw", "-out", str(enc)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ConfigError, match="encrypted private key; gRPC needs it unencrypted"):
        HybridConfig(security={"tls_cert": str(pki.server_cert), "tls_key": str(enc)})


def test_token_never_appears_in_errors_dumps_or_repr(tmp_path, pki, monkeypatch):
    secret = "s3cr3t-" + "x" * 20
    p = write(tmp_path, f'[security]\ntoken_file = "{pki.token_file}"\n')
    with pytest.raises(ConfigError) as err:  # both set, the token given on the command line
        load_config(p, env={}, overrides=[f"security.token={secret}"])
    assert secret not in str(err.value) and f"security.token={REDACTED}" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a mistyped section still hides the value
        load_config(p, env={}, overrides=[f"securty.token={secret}"])
    assert secret not in str(err.value)
    with pytest.raises(ConfigError) as err:  # a non-string token is not echoed
        load_config(write(tmp_path, "[security]\ntoken = 1234567890123\n"), env={})
    assert "1234567890123" not in str(err.value) and "must be a string" in str(err.value)
    with pytest.raises(ConfigError) as err:
        HybridConfig(security={"token": secret + " tail"})
    assert secret not in str(err.value)

    cfg = HybridConfig(security={"token": secret})
    assert cfg.security.resolved_token() == secret
    for text in (repr(cfg), repr(cfg.security), str(cfg.to_dict()), cfg.to_toml()):
        assert secret not in text
    assert cfg.to_dict()["security"]["token"] == REDACTED
    assert cfg.to_dict(redact_secrets=False)["security"]["token"] == secret
    assert cfg.replace(**{"train.max_steps": 2}).security.token == secret
    # The written-out copy refuses to load without the token, and the environment supplies it.
    dump = tmp_path / "dump.toml"
    dump.write_text(cfg.to_toml())
    with pytest.raises(ConfigError, match="never stores the token") as err:
        load_config(dump, env={})
    assert secret not in str(err.value)
    assert load_config(dump, env={"REDHEART_SECURITY__TOKEN": secret}).security.resolved_token() == secret


def test_token_from_environment_or_command_line_is_taken_verbatim(tmp_path):
    p = write(tmp_path, "[model]\n")
    for given, want in (("12345678", "12345678"), ("1e10", "1e10"), ("true", "true"), ('"quoted"', "quoted")):
        assert load_config(p, env={"REDHEART_SECURITY__TOKEN": given}).security.token == want
        assert load_config(p, env={}, overrides=[f"security.token={given}"]).security.token == want


def test_token_file_is_read_and_stripped(pki):
    cfg = HybridConfig(security={"token_file": str(pki.token_file)})
    assert cfg.security.resolved_token() == pki.token
    assert cfg.to_dict()["security"]["token_file"] == str(pki.token_file)  # a path, not a secret

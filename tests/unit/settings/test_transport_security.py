"""SPEC "Transport security": ``AMBIENT_CP_ALLOW_PLAINTEXT`` for the sidecar, the client,
``cp-token get`` and the injector; the injector's CA ConfigMap and plaintext hand-over; the
CP's warning when it serves plain HTTP beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from cp_token.client import TokenError, TokenSource
from cp_token.commands.serve import plaintext_warning
from cp_token.inject.patch import CA_FILE, patch_for
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import load_client_settings
from cp_token.settings.cp import load_settings
from cp_token.settings.inject import InjectSettings, load_inject_settings
from cp_token.settings.sidecar import load_sidecar_settings

ROOT = Path(__file__).resolve().parents[3]
PLAIN = "http://cp-token.ambient-code.svc:8080/token"
LOOPBACK = [
    "http://127.0.0.1:8080/token",
    "http://127.8.9.10/token",
    "http://localhost:8080/token",
    "http://[::1]:8080/token",
]
ALLOWED = [*LOOPBACK, "https://cp-token.ambient-code.svc:8080/token"]


def sidecar(url: str, **extra: str) -> Any:
    return load_sidecar_settings({"AMBIENT_CP_TOKEN_URL": url, **extra})


def client(url: str, **extra: str) -> Any:
    return load_client_settings({"AMBIENT_CP_TOKEN_URL": url, **extra})


LOADERS: list[Callable[..., Any]] = [sidecar, client]


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
def test_plain_http_to_another_host_is_refused(load: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError) as info:
        load(PLAIN)
    assert info.value.variable == "AMBIENT_CP_TOKEN_URL"
    line = str(info.value)
    assert line.startswith("AMBIENT_CP_TOKEN_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT=true" in line and "\n" not in line
    # "false" is the default, said out loud
    with pytest.raises(ConfigError):
        load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="false")


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
def test_plain_http_is_allowed_when_asked_for(load: Callable[..., Any]) -> None:
    settings = load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="true")
    assert settings.cp_token_url == PLAIN and settings.allow_plaintext is True
    with pytest.raises(ConfigError) as info:
        load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="maybe")
    assert info.value.variable == "AMBIENT_CP_ALLOW_PLAINTEXT"


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
@pytest.mark.parametrize("url", ALLOWED)
def test_loopback_and_https_need_no_permission(load: Callable[..., Any], url: str) -> None:
    assert load(url).cp_token_url == url


def test_the_client_library_raises_a_token_error_naming_both() -> None:
    with pytest.raises(TokenError) as info:
        TokenSource.from_env({"AMBIENT_CP_TOKEN_URL": PLAIN})
    assert "AMBIENT_CP_TOKEN_URL" in str(info.value)
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in str(info.value)


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CP_TOKEN_", "SIDECAR_", "AMBIENT_", "BOT_TOKEN", "KUBECONFIG"))
    }
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )


@pytest.mark.parametrize(
    ("args", "prog"),
    [(["-m", "cp_token", "get"], "cp-token get"), (["-m", "sidecar"], "cp-token-sidecar")],
    ids=["cp-token get", "cp-token-sidecar"],
)
def test_commands_exit_2_with_one_line(args: list[str], prog: str, tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.write_text("sa-token")
    done = run(args, AMBIENT_CP_TOKEN_URL=PLAIN, AMBIENT_SA_TOKEN_FILE=str(sa))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{prog}: AMBIENT_CP_TOKEN_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in line
    assert done.stdout == ""


# --------------------------------------------------------------------------- the injector


@pytest.fixture
def inject_env(tmp_path: Path) -> dict[str, str]:
    leaf = trustme.CA().issue_cert("cp-token-inject.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": "cp-token:1",
        "CP_TOKEN_INJECT_CP_URL": "https://cp-token.ambient-code.svc:8080/token",
    }


def test_the_injector_refuses_a_plain_cp_url(inject_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_inject_settings({**inject_env, "CP_TOKEN_INJECT_CP_URL": PLAIN})
    assert info.value.variable == "CP_TOKEN_INJECT_CP_URL"
    assert "AMBIENT_CP_ALLOW_PLAINTEXT=true" in str(info.value)
    for url in LOOPBACK:
        assert load_inject_settings({**inject_env, "CP_TOKEN_INJECT_CP_URL": url}).cp_url == url


def test_the_injector_exits_2_naming_both(inject_env: dict[str, str]) -> None:
    done = run(["-m", "cp_token", "inject"], **{**inject_env, "CP_TOKEN_INJECT_CP_URL": PLAIN})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("cp-token: CP_TOKEN_INJECT_CP_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in line


def sidecar_of(pod: dict[str, Any], settings: InjectSettings) -> tuple[dict[str, Any], list[Any]]:
    """The injected sidecar container and the pod's volumes after the patch."""
    import jsonpatch

    patched = jsonpatch.apply_patch(pod, patch_for(pod, settings), in_place=False)
    return patched["spec"]["initContainers"][0], patched["spec"]["volumes"]


POD: dict[str, Any] = {
    "metadata": {"name": "runner", "labels": {"ambient-code.io/token-sidecar": "true"}},
    "spec": {"containers": [{"name": "runner", "image": "runner:1"}]},
}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_plaintext_permission_is_passed_on_to_sidecars(inject_env: dict[str, str]) -> None:
    allowed = load_inject_settings(
        {**inject_env, "CP_TOKEN_INJECT_CP_URL": PLAIN, "AMBIENT_CP_ALLOW_PLAINTEXT": "true"}
    )
    assert allowed.allow_plaintext and allowed.cp_url == PLAIN
    env = env_of(sidecar_of(POD, allowed)[0])
    assert env["AMBIENT_CP_TOKEN_URL"] == PLAIN
    assert env["AMBIENT_CP_ALLOW_PLAINTEXT"] == "true"
    # ... and the sidecar it configures accepts exactly that environment
    url_env = {k: v for k, v in env.items() if k.startswith("AMBIENT_CP_")}
    assert load_sidecar_settings(url_env).cp_token_url == PLAIN
    strict = load_inject_settings(inject_env)
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env_of(sidecar_of(POD, strict)[0])


def test_the_ca_configmap_is_mounted_in_the_sidecar_only(inject_env: dict[str, str]) -> None:
    settings = load_inject_settings({**inject_env, "CP_TOKEN_INJECT_CA_CONFIGMAP": "cp-token-ca"})
    assert settings.ca_configmap == "cp-token-ca"
    sidecar, volumes = sidecar_of(POD, settings)
    assert env_of(sidecar)["AMBIENT_CP_CA_FILE"] == CA_FILE == "/var/run/ambient-ca/ca.crt"
    (volume,) = [v for v in volumes if v["name"] == "cp-token-ca"]
    assert volume["configMap"]["name"] == "cp-token-ca"
    assert {"key": "ca.crt", "path": "ca.crt"} in volume["configMap"]["items"]
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "cp-token-ca"]
    assert mount == {"name": "cp-token-ca", "mountPath": "/var/run/ambient-ca", "readOnly": True}
    # without the variable: no CA volume, no variable (the system's trust store)
    plain_sidecar, plain_volumes = sidecar_of(POD, load_inject_settings(inject_env))
    assert "AMBIENT_CP_CA_FILE" not in env_of(plain_sidecar)
    assert all(v["name"] != "cp-token-ca" for v in plain_volumes)


def test_a_pod_with_a_volume_named_like_the_ca_is_refused(inject_env: dict[str, str]) -> None:
    from cp_token.inject.patch import Refused

    pod = {**POD, "spec": {**POD["spec"], "volumes": [{"name": "cp-token-ca", "emptyDir": {}}]}}
    with_ca = load_inject_settings({**inject_env, "CP_TOKEN_INJECT_CA_CONFIGMAP": "cp-token-ca"})
    with pytest.raises(Refused, match="cp-token-ca"):
        patch_for(pod, with_ca)
    assert patch_for(pod, load_inject_settings(inject_env))  # the name is free without it


@pytest.mark.parametrize("name", ["Cp-Token-CA", "ca_bundle", "-ca", "a" * 254, "ca crt"])
def test_a_bad_configmap_name_names_the_variable(inject_env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_inject_settings({**inject_env, "CP_TOKEN_INJECT_CA_CONFIGMAP": name})
    assert info.value.variable == "CP_TOKEN_INJECT_CA_CONFIGMAP"


# --------------------------------------------------------------------------- the CP


STATIC = {
    "CP_TOKEN_AUTHN": "static",
    "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ROOT / "examples" / "config" / "dev-identities.json"),
    "CP_TOKEN_MINTER": "static",
    "CP_TOKEN_STATIC_TOKEN": "t",
}


def test_the_cp_warns_when_it_serves_plain_http_beyond_loopback(tmp_path: Path) -> None:
    everywhere = load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": ":8080"})
    warning = plaintext_warning(everywhere)
    assert warning is not None
    assert "0.0.0.0:8080" in warning and "clear text" in warning
    assert "CP_TOKEN_TLS_CERT_FILE" in warning
    loopback = load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:8080"})
    assert plaintext_warning(loopback) is None
    leaf = trustme.CA().issue_cert("cp-token.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = {"CP_TOKEN_TLS_CERT_FILE": str(cert), "CP_TOKEN_TLS_KEY_FILE": str(key)}
    assert plaintext_warning(load_settings({**STATIC, **tls})) is None


def test_with_tls_the_advertised_url_says_https(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("cp-token.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = {"CP_TOKEN_TLS_CERT_FILE": str(cert), "CP_TOKEN_TLS_KEY_FILE": str(key)}
    with pytest.raises(ConfigError) as info:
        load_settings({**STATIC, **tls, "CP_TOKEN_URL": PLAIN})
    assert info.value.variable == "CP_TOKEN_URL"
    https = "https://cp-token.ambient-code.svc:8080/token"
    jwt = {**STATIC, **tls, "CP_TOKEN_MINTER": "jwt", "CP_TOKEN_URL": https}
    assert load_settings(jwt).issuer == "https://cp-token.ambient-code.svc:8080"

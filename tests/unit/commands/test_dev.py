"""``cp-token dev``'s pieces, without starting anything: the files and the environments it
gives the CP and the sidecar load as valid configuration, the dev runner token is allowed and
the refused one is a 403 for the reason the curl line shows, and the curl lines point at the
ports. (The processes, the printed lines pasted into a shell and Ctrl-C:
tests/integration/test_dev.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cp_token.authn.static import parse_identities
from cp_token.commands.dev import (
    DEV_REFUSED_TOKEN,
    DEV_RUNNER_TOKEN,
    DevPorts,
    _write_files,
    cp_env,
    curl_lines,
    sidecar_env,
)
from cp_token.errors import Forbidden
from cp_token.identity import token_hash
from cp_token.policy import RunnerPolicy
from cp_token.settings.cp import load_settings
from cp_token.settings.sidecar import load_sidecar_settings

PORTS = DevPorts(cp=18080, cp_metrics=19090, sidecar=18099)


def test_the_cp_and_the_sidecar_get_valid_loopback_configuration(tmp_path: Path) -> None:
    ids_file, sa_file = _write_files(str(tmp_path))
    cp = load_settings(cp_env(PORTS, ids_file))
    assert (cp.listen_host, cp.listen_port) == ("127.0.0.1", 18080)
    assert (cp.metrics_host, cp.metrics_port) == ("127.0.0.1", 19090)
    assert cp.authn == "static" and cp.minter == "jwt"
    sidecar = load_sidecar_settings(sidecar_env(PORTS, sa_file, str(tmp_path)))
    assert sidecar.cp_token_url == "http://127.0.0.1:18080/token"  # loopback: plain is allowed
    assert (sidecar.listen_host, sidecar.listen_port) == ("127.0.0.1", 18099)
    assert sidecar.token_file == str(tmp_path / "token")
    assert Path(sa_file).read_text() == DEV_RUNNER_TOKEN  # the sidecar presents the runner's


def test_the_runner_token_is_allowed_and_the_refused_one_is_not(tmp_path: Path) -> None:
    ids_file, _ = _write_files(str(tmp_path))
    identities = parse_identities(Path(ids_file).read_bytes())
    assert set(identities) == {token_hash(DEV_RUNNER_TOKEN), token_hash(DEV_REFUSED_TOKEN)}
    policy = RunnerPolicy()
    runner = identities[token_hash(DEV_RUNNER_TOKEN)]
    policy.check_identity(runner)  # a pod-bound session runner: allowed
    assert runner.session_id == "dev"
    with pytest.raises(Forbidden) as info:
        policy.check_identity(identities[token_hash(DEV_REFUSED_TOKEN)])
    assert info.value.reason == "sa_not_allowed"


def test_the_curl_lines_name_the_ports_and_the_tokens() -> None:
    lines = curl_lines(PORTS)
    assert len(lines) == 4 and all(line.startswith("curl ") for line in lines)
    sidecar, runner, refused, jwks = lines
    assert "Ambient-Token-Request: true" in sidecar and "127.0.0.1:18099/token" in sidecar
    assert f"Bearer {DEV_RUNNER_TOKEN}" in runner and "127.0.0.1:18080/token" in runner
    assert f"Bearer {DEV_REFUSED_TOKEN}" in refused and " -i " in refused  # shows the 403
    assert jwks.endswith("http://127.0.0.1:18080/.well-known/jwks.json")

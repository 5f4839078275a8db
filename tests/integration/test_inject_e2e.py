"""Issue 10's end-to-end: what the injector writes into a pod actually works.

A real ``cp-token inject`` mutates an opted-in pod. The injected sidecar's ``command`` and
``env`` are taken from the patched pod and run as a process, with only what a node would
provide rewritten: each volume's mount path becomes a temp directory (the projected SA token
is written where the ``cp-token-sa`` volume puts it), the pod's fixed ports become free
loopback ports, and the CP URL points at a local CP (static authn, jwt minter). The test then
probes the sidecar the way the kubelet does (the ``startupProbe``), and a runner built from
the app container's injected env gets a token through ``cp_token.client``, and the same
token from the injected ``AMBIENT_TOKEN_FILE``.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import trustme

from tests.fakes.admission import opted_in_pod
from tests.integration.inject_rig import start_injector, tls_files
from tests.integration.procs import Proc, cp_serve, free_port, run_cmd, write_identities

USERNAME = "system:serviceaccount:session-ns:session-abc-sa"
SA_TOKEN = "projected-sa-token-e2e"

RUNNER = """
import os, sys
from cp_token.client import TokenSource
source = TokenSource.from_env()
token = source.token()
with open(os.environ["AMBIENT_TOKEN_FILE"]) as fh:
    from_file = fh.read().strip()
print(token)
print(from_file)
"""

Obj = dict[str, Any]


def volume_dirs(pod: Obj, root: Path) -> dict[str, Path]:
    """A temp directory per pod volume; the projected SA token written into its volume."""
    dirs: dict[str, Path] = {}
    for volume in pod["spec"]["volumes"]:
        d = root / volume["name"]
        d.mkdir(parents=True)
        for source in volume.get("projected", {}).get("sources", []):
            if "serviceAccountToken" in source:
                (d / source["serviceAccountToken"]["path"]).write_text(SA_TOKEN)
        dirs[volume["name"]] = d
    return dirs


def rewrite(value: str, container: Obj, dirs: dict[str, Path], ports: dict[int, int]) -> str:
    """A container env value as it reads on this machine: mount paths -> temp dirs,
    the pod's fixed ports -> free loopback ports."""
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if value == mount["mountPath"] or value.startswith(mount["mountPath"] + "/"):
            value = str(dirs[mount["name"]]) + value[len(mount["mountPath"]) :]
            break
    for pod_port, local in ports.items():
        value = value.replace(f"0.0.0.0:{pod_port}", f"127.0.0.1:{local}")
        value = value.replace(f"127.0.0.1:{pod_port}", f"127.0.0.1:{local}")
    return value


def env_of(container: Obj, dirs: dict[str, Path], ports: dict[int, int]) -> dict[str, str]:
    return {e["name"]: rewrite(e["value"], container, dirs, ports) for e in container["env"]}


def claims(token: str) -> Obj:
    part = token.split(".")[1]
    loaded: Obj = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def test_the_injected_sidecar_runs_and_a_runner_gets_a_token(tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", SA_TOKEN, USERNAME, "runner-abc")
    cp_env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "jwt",
    }
    ca = trustme.CA()
    cert, key = tls_files(tmp_path, ca)
    procs: list[Proc] = []
    try:
        cp, cp_base, cp_metrics = cp_serve(cp_env, tmp_path / "cp.log")
        procs.append(cp)
        injector = start_injector(
            cert, key, tmp_path / "inject.log", ca, "cp-token:e2e", f"{cp_base}/token"
        )
        procs.append(injector.proc)
        cp.wait_http(f"{cp_metrics}/readyz")

        pod = opted_in_pod(containers=[{"name": "runner", "image": "runner:1"}])
        answer, mutated = injector.review(pod)
        assert answer["allowed"] is True
        sidecar = mutated["spec"]["initContainers"][0]
        runner = mutated["spec"]["containers"][0]

        dirs = volume_dirs(mutated, tmp_path / "volumes")
        ports = {8099: free_port(), 9099: free_port()}
        command = [shutil.which(sidecar["command"][0], path=str(Path(sys.executable).parent))]
        assert command[0] is not None, "the sidecar's command is installed with the package"
        sidecar_proc = Proc(
            [*command, *sidecar.get("args", [])],  # type: ignore[list-item]
            env_of(sidecar, dirs, ports),
            tmp_path / "sidecar.log",
        )
        procs.append(sidecar_proc)

        # the kubelet's startupProbe: the app container starts once this answers 200
        probe = sidecar["startupProbe"]["httpGet"]
        sidecar_proc.wait_http(f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}")
        live = sidecar["livenessProbe"]["httpGet"]
        health = httpx.get(f"http://127.0.0.1:{ports[live['port']]}{live['path']}", trust_env=False)
        assert health.status_code == 200

        runner_env = env_of(runner, dirs, ports)
        assert runner_env["AMBIENT_TOKEN_SIDECAR_URL"] == f"http://127.0.0.1:{ports[8099]}/token"
        result = run_cmd([sys.executable, "-c", RUNNER], runner_env)
        assert result.returncode == 0, result.stderr + sidecar_proc.output()[-2000:]
        token, from_file = result.stdout.split()
        assert token == from_file
        assert claims(token)["sub"] == USERNAME
        assert claims(token)["pod"] == "runner-abc"
        assert SA_TOKEN not in sidecar_proc.output() and token not in sidecar_proc.output()
    finally:
        codes = [p.terminate() for p in reversed(procs)]
    assert codes == [0] * len(codes)

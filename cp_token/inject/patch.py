"""What the injector does to a pod: a pure function of the admission request and settings.

:func:`decide` takes the ``request`` of an AdmissionReview and returns a :class:`Decision`:
mutate (with the RFC 6902 JSON Patch of :func:`patch_for`), skip (allowed unchanged) or
refuse (allowed: false, with a message). No I/O, no web framework: plain data in, plain data
out, so it is tested with property tests and the Kubernetes schemas.

The patch is built from the pod *as sent*: an absent array is created with ``add`` of the
whole array, a present one grows with ``add .../-`` (or ``.../0`` for the sidecar, which
must come first), so the patch applies cleanly whatever the pod already holds, and it
touches nothing outside what SPEC lists (the sidecar, three volumes, two env variables and
one mount per selected container).

A pod annotated ``ambient-code.io/token-sidecar-mode: sealed`` gets a sealed sidecar
(SPEC "Sealed mode"): ``SIDECAR_SEALED=true`` and the injector's upstreams, no token file
(no ``cp-token-file`` volume, no ``SIDECAR_TOKEN_FILE``, no mount in the app containers),
and in the app containers ``AMBIENT_API_URL`` / ``AMBIENT_GRPC_ADDR`` instead of
``AMBIENT_TOKEN_SIDECAR_URL`` / ``AMBIENT_TOKEN_FILE``. The projected ServiceAccount token
is mounted in the sidecar only, in both modes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cp_token.settings.client import SA_TOKEN_DIR
from cp_token.settings.common import CP_AUDIENCE, is_loopback_host
from cp_token.settings.inject import InjectSettings
from cp_token.settings.sidecar import (
    ALLOW_PLAINTEXT,
    GRPC_LISTEN_ADDR,
    LISTEN_ADDR,
    UPSTREAM_PREFIX,
)

__all__ = [
    "CONTAINERS_ANNOTATION",
    "MODE_ANNOTATION",
    "OPT_IN_LABEL",
    "SEALED_MODE",
    "SIDECAR_NAME",
    "VOLUME_NAMES",
    "Decision",
    "Refused",
    "decide",
    "patch_for",
    "pointer",
    "sidecar_container",
]

OPT_IN_LABEL = "ambient-code.io/token-sidecar"
CONTAINERS_ANNOTATION = "ambient-code.io/token-sidecar-containers"
MODE_ANNOTATION = "ambient-code.io/token-sidecar-mode"
SEALED_MODE = "sealed"
SIDECAR_NAME = "cp-token-sidecar"

SA_VOLUME = "cp-token-sa"
FILE_VOLUME = "cp-token-file"
TMP_VOLUME = "cp-token-tmp"
CA_VOLUME = "cp-token-ca"  # only with CP_TOKEN_INJECT_CA_CONFIGMAP
VOLUME_NAMES = (SA_VOLUME, FILE_VOLUME, TMP_VOLUME)

SA_TOKEN_PATH = CP_AUDIENCE  # the file the sidecar reads by default (AMBIENT_SA_TOKEN_FILE)
TOKEN_DIR = "/var/run/ambient"
TOKEN_FILE = f"{TOKEN_DIR}/token"
SIDECAR_ADDR = LISTEN_ADDR
SIDECAR_URL = f"http://{SIDECAR_ADDR}/token"
SIDECAR_UPSTREAM_URL = f"http://{SIDECAR_ADDR}{UPSTREAM_PREFIX}"  # + the first upstream's name
METRICS_PORT = 9099
CA_DIR = "/var/run/ambient-ca"
CA_FILE = f"{CA_DIR}/ca.crt"  # the key the trust-manager Bundle writes

Op = dict[str, Any]
Action = Literal["mutated", "skipped", "refused"]


class Refused(Exception):
    """The pod cannot be mutated as sent; ``message`` says why (shown to whoever created it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Decision:
    """The answer to one admission request.

    ``action`` is also the metrics result; ``message`` is the refusal (or, for a skip, why);
    ``warnings`` go back to the client (``kubectl`` prints them).
    """

    action: Action
    patch: list[Op] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON Pointer: ``~`` becomes ``~0`` and ``/`` becomes ``~1`` in each part."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


# --------------------------------------------------------------------------- what is added


def _trust_env(settings: InjectSettings) -> list[dict[str, Any]]:
    """The sidecar's CA file and plaintext permission, as the injector is configured."""
    env: list[dict[str, Any]] = []
    if settings.ca_configmap:
        env.append({"name": "AMBIENT_CP_CA_FILE", "value": CA_FILE})
    if settings.allow_plaintext:
        env.append({"name": "AMBIENT_CP_ALLOW_PLAINTEXT", "value": "true"})
    return env


def _sealed_env(settings: InjectSettings) -> list[dict[str, Any]]:
    """A sealed sidecar's variables: sealing and where the pod's API calls go."""
    env: list[dict[str, Any]] = [{"name": "SIDECAR_SEALED", "value": "true"}]
    if settings.upstreams:
        value = ",".join(f"{name}={url}" for name, url in settings.upstreams)
        env.append({"name": "SIDECAR_UPSTREAMS", "value": value})
    if settings.grpc_upstream:
        env.append({"name": "SIDECAR_GRPC_UPSTREAM", "value": settings.grpc_upstream})
        env.append({"name": "SIDECAR_GRPC_LISTEN_ADDR", "value": GRPC_LISTEN_ADDR})
    if not settings.allow_plaintext and any(_plaintext(url) for _, url in settings.upstreams):
        # the injector was allowed it (its settings checked): so is the sidecar
        env.append({"name": ALLOW_PLAINTEXT, "value": "true"})
    return env


def _plaintext(url: str) -> bool:
    """An http:// URL whose host is not a loopback address."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
    return scheme.lower() == "http" and not is_loopback_host(host)


def sidecar_container(settings: InjectSettings, *, sealed: bool = False) -> dict[str, Any]:
    """The native sidecar: an init container with ``restartPolicy: Always``; ``sealed``: no
    token file, the upstreams instead."""
    probe_port = METRICS_PORT
    token_file = [] if sealed else [{"name": "SIDECAR_TOKEN_FILE", "value": TOKEN_FILE}]
    file_mount = [] if sealed else [{"name": FILE_VOLUME, "mountPath": TOKEN_DIR}]
    ca_mount = [{"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}]
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "command": ["cp-token-sidecar"],
        "restartPolicy": "Always",
        "env": [
            {"name": "AMBIENT_CP_TOKEN_URL", "value": settings.cp_url},
            {"name": "SIDECAR_LISTEN_ADDR", "value": SIDECAR_ADDR},
            {"name": "AMBIENT_SA_TOKEN_FILE", "value": f"{SA_TOKEN_DIR}/{SA_TOKEN_PATH}"},
            *token_file,
            {"name": "SIDECAR_METRICS_ADDR", "value": f"0.0.0.0:{METRICS_PORT}"},
            *_trust_env(settings),
            *(_sealed_env(settings) if sealed else []),
        ],
        "ports": [{"name": "cpt-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        # The kubelet starts the app containers once this succeeds: once a token is held.
        # Probes come from the kubelet, not loopback, hence the metrics address.
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": probe_port},
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            # two minutes for the first token (the CP may be rolling out) before a restart
            "failureThreshold": 120,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": probe_port},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": SA_VOLUME, "mountPath": SA_TOKEN_DIR, "readOnly": True},
            *file_mount,
            {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 (its own emptyDir)
            *(ca_mount if settings.ca_configmap else []),
        ],
    }


def volume_names(settings: InjectSettings, *, sealed: bool = False) -> tuple[str, ...]:
    """The names of the volumes the patch adds (the CA's only when configured; no token
    file's when sealed)."""
    names = tuple(n for n in VOLUME_NAMES if not (sealed and n == FILE_VOLUME))
    return (*names, CA_VOLUME) if settings.ca_configmap else names


def volumes(settings: InjectSettings, *, sealed: bool = False) -> list[dict[str, Any]]:
    """The volumes: the projected SA token, the token file's emptyDir (not when sealed), the
    sidecar's /tmp, and with CP_TOKEN_INJECT_CA_CONFIGMAP the CP's CA (the ConfigMap a
    trust-manager Bundle writes into every managed namespace)."""
    ca = [
        {
            "name": CA_VOLUME,
            "configMap": {
                "name": settings.ca_configmap,
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
            },
        }
    ]
    return [
        {
            "name": SA_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": settings.audience,
                            "expirationSeconds": settings.token_expiration,
                            "path": SA_TOKEN_PATH,
                        }
                    }
                ]
            },
        },
        # An emptyDir, not a subPath: the sidecar replaces the file atomically (rename).
        *(
            []
            if sealed
            else [{"name": FILE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]
        ),
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}},
        *(ca if settings.ca_configmap else []),
    ]


APP_ENV = (
    {"name": "AMBIENT_TOKEN_SIDECAR_URL", "value": SIDECAR_URL},
    {"name": "AMBIENT_TOKEN_FILE", "value": TOKEN_FILE},
)
APP_MOUNT = {"name": FILE_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}


def sealed_app_env(settings: InjectSettings) -> tuple[dict[str, str], ...]:
    """A sealed pod's app containers: the sidecar's egress for the first upstream, and its
    gRPC listener when a gRPC upstream is configured. No token, no file."""
    env: list[dict[str, str]] = []
    if settings.upstreams:
        first = settings.upstreams[0][0]
        env.append({"name": "AMBIENT_API_URL", "value": f"{SIDECAR_UPSTREAM_URL}{first}"})
    if settings.grpc_upstream:
        env.append({"name": "AMBIENT_GRPC_ADDR", "value": GRPC_LISTEN_ADDR})
    return tuple(env)


# --------------------------------------------------------------------------- reading the pod


def _list_at(obj: Mapping[str, Any], key: str, where: str) -> list[Any] | None:
    """``obj[key]`` when it is a list, None when absent or null; Refused for anything else."""
    value = obj.get(key)
    if value is None or isinstance(value, list):
        return value
    raise Refused(f"the pod is malformed: {where}.{key} is not a list")


def _named(items: list[Any], where: str) -> list[dict[str, Any]]:
    """The items of a list of named objects, each checked to be an object with a string name."""
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise Refused(f"the pod is malformed: {where}[{i}] is not an object with a name")
    return items


def _names(items: list[dict[str, Any]] | None) -> list[str]:
    return [item["name"] for item in items or []]


def _selection(annotations: Any) -> set[str] | None:
    """The container names of the selection annotation; None when absent or empty."""
    if not isinstance(annotations, dict):
        return None
    raw = annotations.get(CONTAINERS_ANNOTATION)
    if not isinstance(raw, str):
        return None
    names = {name.strip() for name in raw.split(",") if name.strip()}
    return names or None


def _container_names(pod: Mapping[str, Any]) -> set[str]:
    """Names of the pod's containers and init containers (tolerates any shape)."""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return set()
    return {
        c["name"]
        for key in ("containers", "initContainers")
        if isinstance(spec.get(key), list)
        for c in spec[key]
        if isinstance(c, dict) and isinstance(c.get("name"), str)
    }


def _mounts_token_dir(mounts: list[dict[str, Any]] | None) -> bool:
    """True when a container already mounts something at the token directory."""
    for mount in mounts or []:
        path = mount.get("mountPath")
        if isinstance(path, str) and posixpath.normpath(path) == TOKEN_DIR:
            return True
    return False


def _container_ops(
    base: str,
    index: int,
    c: dict[str, Any],
    app_env: tuple[dict[str, str], ...] = APP_ENV,
    mount: bool = True,
) -> list[Op]:
    """Env (unless already set) and the read-only token mount (unless the dir is taken, or
    not ``mount``: a sealed pod's)."""
    where = f"{base}[{index}]"
    ops: list[Op] = []
    env = _list_at(c, "env", where)
    if env is not None:
        _named(env, f"{where}.env")
    have = set(_names(env))
    missing = [dict(e) for e in app_env if e["name"] not in have]
    path = pointer("spec", base, index)
    if missing:
        if env is None:
            ops.append({"op": "add", "path": path + "/env", "value": missing})
        else:
            ops += [{"op": "add", "path": path + "/env/-", "value": e} for e in missing]
    mounts = _list_at(c, "volumeMounts", where)
    if mounts is not None:
        _named(mounts, f"{where}.volumeMounts")
    if mount and not _mounts_token_dir(mounts):
        if mounts is None:
            ops.append({"op": "add", "path": path + "/volumeMounts", "value": [dict(APP_MOUNT)]})
        else:
            ops.append({"op": "add", "path": path + "/volumeMounts/-", "value": dict(APP_MOUNT)})
    return ops


def _sealed(annotations: Any, settings: InjectSettings) -> bool:
    """Whether the pod asks for a sealed sidecar; Refused for a mode we do not know (a typo
    must not leave a pod unsealed) and for a sealed pod while no upstream is configured
    (its app containers would have no way to call the API)."""
    raw = annotations.get(MODE_ANNOTATION) if isinstance(annotations, dict) else None
    mode = raw.strip() if isinstance(raw, str) else ""
    if not mode:
        return False
    if mode != SEALED_MODE:
        raise Refused(
            f"unknown {MODE_ANNOTATION} {mode[:64]!r}: the one mode is {SEALED_MODE!r} "
            "(remove the annotation for the default, where containers may read the token)"
        )
    if not settings.upstreams and not settings.grpc_upstream:
        raise Refused(
            f"{MODE_ANNOTATION}: {SEALED_MODE} needs the injector's CP_TOKEN_INJECT_UPSTREAMS or "
            "CP_TOKEN_INJECT_GRPC_UPSTREAM, and neither is set: a sealed pod would have no way "
            "to call the API; ask the platform's operator to configure them"
        )
    return True


# --------------------------------------------------------------------------- the patch


def patch_for(pod: Mapping[str, Any], settings: InjectSettings) -> list[Op]:
    """The JSON Patch that adds the token sidecar to ``pod`` as sent; raises :class:`Refused`.

    ``pod`` must not already hold the sidecar (see :func:`decide`). A pod whose volumes use
    one of the three names is refused rather than half-mutated, and so is one whose shape
    the patch cannot address (the API server would reject it anyway).
    """
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise Refused("the pod is malformed: spec is not an object")
    metadata = pod.get("metadata")
    containers = _named(_list_at(spec, "containers", "spec") or [], "spec.containers")
    inits = _list_at(spec, "initContainers", "spec")
    init_list = _named(inits or [], "spec.initContainers")
    vols = _list_at(spec, "volumes", "spec")
    taken = set(_names(_named(vols or [], "spec.volumes")))
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    sealed = _sealed(annotations, settings)
    for name in volume_names(settings, sealed=sealed):
        if name in taken:
            raise Refused(
                f"the pod already has a volume named {name!r}, which the token sidecar "
                f"injector needs; rename that volume or drop the {OPT_IN_LABEL} label"
            )

    selected = _selection(annotations)
    app_env = sealed_app_env(settings) if sealed else APP_ENV
    ops: list[Op] = []
    # App containers first, at their indices in the pod as sent; the sidecar is inserted last.
    for base, items in (("containers", containers), ("initContainers", init_list)):
        for i, c in enumerate(items):
            chosen = c["name"] in selected if selected is not None else base == "containers"
            if chosen:
                ops += _container_ops(base, i, c, app_env, mount=not sealed)
    added = volumes(settings, sealed=sealed)
    if vols is None:
        ops.append({"op": "add", "path": "/spec/volumes", "value": added})
    else:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in added]
    sidecar = sidecar_container(settings, sealed=sealed)
    if inits is None:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        # First, so init containers (other webhooks' included) start after a token is held.
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    return ops


# --------------------------------------------------------------------------- the decision


def _is_pod_create(request: Mapping[str, Any]) -> str | None:
    """None for a CREATE of a v1 Pod (by kind and resource both), else why not."""
    kind, resource = request.get("kind"), request.get("resource")
    if not isinstance(kind, dict) or not isinstance(resource, dict):
        return "not a pod"
    if (kind.get("group"), kind.get("version"), kind.get("kind")) != ("", "v1", "Pod"):
        return "not a pod"
    if (resource.get("group"), resource.get("version"), resource.get("resource")) != (
        "",
        "v1",
        "pods",
    ):
        return "not a pod"
    if request.get("subResource"):
        return "a pod subresource"
    if request.get("operation") != "CREATE":
        return "not a CREATE"
    return None


def decide(request: Mapping[str, Any], settings: InjectSettings) -> Decision:
    """Mutate, skip or refuse one admission ``request`` (the AdmissionReview's ``request``)."""
    why_not = _is_pod_create(request)
    if why_not is not None:
        return Decision("skipped", message=why_not)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return Decision("skipped", message="the request carries no pod object (no opt-in label)")
    metadata = pod.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    if not isinstance(labels, dict) or labels.get(OPT_IN_LABEL) != "true":
        return Decision("skipped", message=f'no {OPT_IN_LABEL}: "true" label')
    if SIDECAR_NAME in _container_names(pod):
        return Decision("skipped", message=f"already has a {SIDECAR_NAME} container")
    try:
        patch = patch_for(pod, settings)
    except Refused as exc:
        return Decision("refused", message=exc.message)
    return Decision("mutated", patch=patch, warnings=_warnings(pod))


def _warnings(pod: Mapping[str, Any]) -> list[str]:
    """Names in the selection annotation that match no container (a likely typo)."""
    metadata = pod.get("metadata")
    selected = _selection(metadata.get("annotations") if isinstance(metadata, dict) else None)
    if not selected:
        return []
    unknown = sorted(selected - _container_names(pod))
    if not unknown:
        return []
    return [f"{CONTAINERS_ANNOTATION} names no container called {', '.join(unknown)}"]

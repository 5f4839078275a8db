"""Every kustomization under k8s/, as it ships, is accepted by a real API server with strict
server-side field validation (custom resources against their projects' real CRDs), and every
object it renders is then stored there."""

from __future__ import annotations

import pytest
import yaml

from .cluster import ROOT, Cluster
from .conftest import kustomizations


@pytest.mark.parametrize("folder", [d.name for d in kustomizations()])
def test_every_rendered_object_is_stored(
    cluster: Cluster, applied: dict[str, str], example_session: str, folder: str
) -> None:
    rendered = cluster.kubectl("kustomize", str(ROOT / "k8s" / folder)).stdout
    items = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert items, folder
    for obj in items:
        meta = obj["metadata"]
        args = ["get", obj["kind"], meta["name"], "-o", "name"]
        if meta.get("namespace"):
            args += ["-n", meta["namespace"]]
        got = cluster.kubectl(*args, check=False)
        assert got.returncode == 0, f"{folder}: {obj['kind']}/{meta['name']}: {got.stderr}"


def test_the_folders_cover_what_ships(applied: dict[str, str]) -> None:
    """The tier applies every folder: base, injector, observability, trust (and the session)."""
    assert {"base", "injector", "observability", "trust"} <= set(applied)

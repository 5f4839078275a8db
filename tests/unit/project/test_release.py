"""One version, written once (``cp_token.__version__``), and everything that shows or pins it
agrees: the package metadata, ``cp-token --version``, the build_info metrics, CHANGELOG.md,
the Dockerfile's label, and the image of every kustomization (the injected sidecar's
included), never ``latest``."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import cp_token
from cp_token.cli import main

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
VERSION = cp_token.__version__
IMAGE = f"cp-token:{VERSION}"


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders the kustomizations (apt-get install kubectl)"
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def images_in(obj: Any) -> list[str]:
    """Every container image and every CP_TOKEN_INJECT_IMAGE value in a rendered object."""
    found: list[str] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("image"), str):
            found.append(obj["image"])
        if obj.get("name") == "CP_TOKEN_INJECT_IMAGE" and "value" in obj:
            found.append(obj["value"])
        for value in obj.values():
            found += images_in(value)
    elif isinstance(obj, list):
        for value in obj:
            found += images_in(value)
    return found


def test_the_version_is_a_release_number() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION


def test_the_package_metadata_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "written once: in cp_token/__init__.py"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "cp_token.__version__"}
    # the installed metadata (make reinstalls when cp_token/__init__.py changes)
    assert importlib.metadata.version("cp-token") == VERSION


def test_cp_token_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"cp-token {VERSION}\n"


def test_the_changelog_has_the_release() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
    assert f"[{VERSION}]: " in changelog  # the heading's link target


def test_the_dockerfile_labels_the_version() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG VERSION={VERSION}\n" in dockerfile
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile


def test_every_kustomization_pins_the_image_to_the_version() -> None:
    """Each kustomization that runs the image pins it with `images:` (the one place an
    overlay overrides), and every image it renders, the injected sidecar's included, is the
    release's."""
    pinned = 0
    for directory in kustomizations():
        rendered = render(directory)
        images = [image for obj in rendered for image in images_in(obj)]
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        entries = [i for i in spec.get("images", []) if i["name"] == "cp-token"]
        if not images:
            assert not entries, directory
            continue
        pinned += 1
        assert entries == [{"name": "cp-token", "newTag": VERSION}], directory
        assert set(images) == {IMAGE}, (directory, images)
    assert pinned >= 3  # base, injector, example-session


def test_no_manifest_names_latest() -> None:
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"cp-token:latest|:latest\b", text), path
        for image in re.findall(r"\bcp-token:[\w.\-]+", text):
            assert image == IMAGE, (path, image)

"""The Dockerfile builds the tested stack: its torch is constraints.txt's, dev tools only in the dev target.

No Docker engine here: the checks read the file (hadolint lints it in tests/test_project.py).
"""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO

PACKAGES = ("manifests", "curation", "captioning", "training")


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) of each named build stage."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = line.split(" AS ")[-1].strip()
            found[current] = []
        found[current].append(line)
    return found


def pin(name: str) -> str:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return next(line.split("==")[1] for line in lines if line.lower().startswith(f"{name}=="))


def base_image() -> str:
    return stages()["base"][0].split()[1]


def test_base_image_torch_matches_constraints():
    """A PyTorch base must carry the pinned torch; a plain Python base installs it from the constraints."""
    image = base_image()
    base = stages()["base"]
    if image.startswith("pytorch/pytorch:"):
        assert image.split(":")[1].split("-")[0] == pin("torch"), f"{image} vs torch=={pin('torch')}"
        return
    header = (REPO / "constraints.txt").read_text().splitlines()[0]
    python = re.fullmatch(r"python:(\d+\.\d+)[.\w-]*", image)
    assert python, f"unexpected base image {image}"
    assert f"Python {python[1]}," in header, f"{image} vs constraints.txt header: {header}"
    install = next(i for i in base if "pip install" in i)
    assert "-c constraints.txt" in install and "grep -v" not in install  # torch is not dropped from the pins
    assert any("import torch" in i and "torch==" in i for i in base)  # the build checks the version


def test_dependencies_are_installed_before_the_code():
    for stage in ("base", "runtime", "dev"):
        lines = stages()[stage]
        copies_code = [i for i, line in enumerate(lines) if line.startswith("COPY") and any(
            re.search(rf"\b{p}\b", line) for p in (*PACKAGES, ".")
        ) and "pyproject.toml" not in line]  # fmt: skip
        installs_deps = [i for i, line in enumerate(lines) if "-r /tmp/requirements" in line]
        assert all(i < j for i in installs_deps for j in copies_code), stage
    assert not [line for line in stages()["base"] if line.startswith("COPY") and "pyproject" not in line]


def test_runtime_image_has_no_dev_tools_and_runs_as_a_user_with_a_writable_work_dir():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev_tools = [re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["dev"]]
    runtime = stages()["base"] + stages()["runtime"]
    assert list(stages())[-1] == "runtime"  # `docker build .` builds it
    for line in runtime:
        assert "[dev]" not in line and "optional-dependencies" not in line, line
        assert not [tool for tool in dev_tools if re.search(rf"\b{re.escape(tool)}\b", line)], line
    assert "USER 1000" in stages()["runtime"] and "WORKDIR /work" in stages()["runtime"]
    assert any(re.search(r"useradd .*--uid 1000 .*chown \S+ /work", line) for line in runtime)
    # The head is package data, checked from outside the source tree after the install.
    assert any("load_aesthetic_head" in line for line in stages()["runtime"])
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "assets/*" in package_data["curation"]
    for package in PACKAGES:
        assert any(line.startswith(f"COPY {package} ") for line in stages()["runtime"]), package


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "/demo_out"} <= set(ignored)

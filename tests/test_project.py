"""Project-level checks: packaging, the import arrows of the architecture, the Dockerfile, the docs."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN

PACKAGES = ("manifests", "curation", "captioning", "training")


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """Top-level module names imported by each file of a package (static, so lazy imports count too)."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("manifests", {"curation", "captioning", "training", "tests"}),
        ("curation", {"captioning", "training", "tests"}),
        ("captioning", {"curation", "training", "tests"}),
        ("training", {"curation", "captioning", "ray", "tests"}),
    ],
)
def test_import_arrows_run_one_way(package, forbidden):
    offenders = {
        path: names & forbidden for path, names in imported_top_levels(package).items() if names & forbidden
    }
    assert offenders == {}


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_architecture_doc_names_every_package():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for package in PACKAGES:
        assert f"`{package}/`" in doc
        assert (REPO / package / "__init__.py").exists()


def test_readme_and_ci_use_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    for command in (
        "ray job submit --working-dir . -- python curation/run.py",
        "torchrun --nproc_per_node=",
        "duckdb",
    ):
        assert command in readme


def test_scripts_import_packages_when_run_by_path(tmp_path):
    for script in ("curation/run.py", "captioning/run.py", "training/main.py"):
        result = subprocess.run(
            [str(VENV_BIN / "python"), str(REPO / script), "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower()


def test_package_metadata():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "pixsigma"
    assert {"dev", "vllm"} <= set(project["optional-dependencies"])
    # Ranges, not pins, for torch: CUDA users bring their own build.
    assert not any(d.startswith(("torch==", "torchvision==")) for d in project["dependencies"])
    pins = Path(REPO / "constraints.txt").read_text().splitlines()
    assert sum(line.startswith("torch==") for line in pins) == 1


def console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


# One name for one thing across every entry point (STYLE.md, "CLI vocabulary").
RETIRED_FLAGS = (
    "--root",
    "--out ",
    "--json",
    "--num-actors",
    "--aesthetic-actors",
    "--aesthetic-gpus",
    "--n ",
)


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_console_scripts_share_one_vocabulary(script, capsys):
    import importlib

    module, _, function = console_scripts()[script].partition(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "(default:" in help_text, f"{script}: --help shows no defaults"
    assert not [flag for flag in RETIRED_FLAGS if flag in help_text + " "], help_text
    assert "--input" in help_text or "--config" in help_text
    assert (VENV_BIN / script).exists(), f"{script} is not installed (pip install -e . installs it)"

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


def module_imports() -> dict[str, set[str]]:
    """Project module → the project modules it imports, anywhere in the file (lazy and TYPE_CHECKING included)."""
    files = {path: ".".join(path.relative_to(REPO).with_suffix("").parts) for package in PACKAGES
             for path in (REPO / package).rglob("*.py")}  # fmt: skip
    modules = {name.removesuffix(".__init__") for name in files.values()}

    def resolve(name: str) -> str | None:  # the longest project-module prefix of a dotted name
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)

    edges: dict[str, set[str]] = {}
    for path, name in files.items():
        me, targets = name.removesuffix(".__init__"), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
        edges[me] = {t for t in targets if t is not None and t != me}
    return edges


def test_no_two_modules_import_each_other_even_through_others():
    """The house style's one-way arrows inside packages too: the import graph has no circle (issue 19 §8)."""
    edges, state, circles = module_imports(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_inference_side_points_one_way():
    """formats (convert) ← diffusers assembly (pipeline) ← loading any source (sample) ← the CLIs."""
    layers = {"training.convert": 0, "training.pipeline": 1, "training.sample": 2, "training.export": 3,
              "training.evaluate": 3}  # fmt: skip
    edges = module_imports()
    upward = {(m, t) for m, rank in layers.items() for t in edges[m] if layers.get(t, -1) > rank}
    assert upward == set()


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

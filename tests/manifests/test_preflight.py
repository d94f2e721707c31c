"""Preflight: inputs, outputs and models are checked in seconds, each failure one line naming the flag."""

from __future__ import annotations

import json

import pytest

from manifests import preflight
from manifests.checks import InputError
from manifests.preflight import PreflightError
from tests.manifests.factories import make_run

DEFAULT_CLIP = ("ViT-L-14-quickgelu", "openai")  # curation's default: open_clip name + pretrained tag
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache; ``add(repo, *files)`` puts a snapshot of a repo in it, as a download would."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo: str, *files: str) -> str:
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        snapshot = folder / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in files:
            (snapshot / name).write_bytes(b"{}")
        return str(snapshot)

    return add


@pytest.fixture
def in_ray_job(monkeypatch):
    """The environment Ray's job supervisor gives an entrypoint (`ray job submit --working-dir .`)."""
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}, "metadata": {"job_submission_id": "x"}}
    monkeypatch.setenv(preflight.RAY_JOB_ENV, json.dumps(config))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_inputs(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    preflight.check_inputs("--input", [str(tmp_path), str(tmp_path / "*.jpg"), f"file://{tmp_path}/a.jpg"])
    with pytest.raises(PreflightError) as err:
        preflight.check_input("--input", str(tmp_path / "missing"))
    assert one_line(err).startswith("--input ") and "no such file or folder" in str(err.value)
    with pytest.raises(PreflightError, match="the glob matches nothing"):
        preflight.check_input("--input", str(tmp_path / "*.png"))


def test_uri_inputs():
    import fsspec

    fsspec.filesystem("memory").pipe("/preflight/a.jpg", b"x")
    preflight.check_input("--input", "memory://preflight/")
    preflight.check_input("--input", "memory://preflight/*.jpg")
    with pytest.raises(PreflightError, match="nothing there"):
        preflight.check_input("--input", "memory://preflight/missing")
    with pytest.raises(PreflightError) as err:  # fsspec knows oci:// but its backend (ocifs) is not installed
        preflight.check_input("--input", "oci://bucket/raw/")
    assert "no fsspec backend for oci:// is installed" in one_line(err)
    with pytest.raises(PreflightError, match="Protocol not known: nosuchfs"):
        preflight.check_input("--input", "nosuchfs://bucket/raw/")


def test_output(tmp_path):
    target = tmp_path / "new" / "run"
    preflight.check_output("--output", str(target))
    assert not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "file").write_text("")
    for bad, reason in (
        (tmp_path / "file", "is a file"),
        (tmp_path / "file" / "run", "is a file"),
        ("/proc/pixsigma-preflight/run", "cannot write in /proc"),  # even root cannot write there
        ("s3://bucket/run", "storage URIs are accepted for inputs only"),
    ):
        with pytest.raises(PreflightError) as err:
            preflight.check_output("--output", str(bad))
        assert reason in one_line(err)


def test_run_folder(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):  # manifests.db.require_run's checks
        preflight.check_run_folder("--input", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="holds no manifests/ folder"):
        preflight.check_run_folder("--input", str(tmp_path))
    with pytest.raises(PreflightError, match="not a URI"):
        preflight.check_run_folder("--input", "s3://bucket/run")
    make_run(tmp_path, num_images=2)
    preflight.check_run_folder("--input", str(tmp_path))


def test_relative_paths_refused_inside_a_ray_job(tmp_path, monkeypatch, in_ray_job):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert preflight.ray_job() == preflight.RayJob(submission_id="x", working_dir="gcs://_ray_pkg_0.zip")
    for check, flag in ((preflight.check_input, "--input"), (preflight.check_output, "--output")):
        with pytest.raises(PreflightError) as err:
            check(flag, "corpus")  # exists in the copy, and is still refused
        message = one_line(err)
        assert message.startswith(f"{flag} 'corpus' is a relative path inside a Ray job")
        assert "copy of --working-dir" in message and "absolute path" in message
    preflight.check_input("--input", str(tmp_path / "corpus"))
    preflight.check_output("--output", str(tmp_path / "out"))


def test_relative_paths_fine_outside_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.delenv(preflight.RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert preflight.ray_job() is None
    preflight.check_input("--input", "corpus")
    preflight.check_output("--output", "out")


def test_models(tmp_path, hf_cache):
    (tmp_path / "t5").mkdir()
    assert preflight.check_model("--t5", str(tmp_path / "t5")) == str(tmp_path / "t5")
    with pytest.raises(PreflightError) as err:
        preflight.check_model("--model", "llava-hf/llava-v1.6-mistral-7b-hf")
    message = one_line(err)
    assert message.startswith(
        "--model 'llava-hf/llava-v1.6-mistral-7b-hf' is neither a local path nor a hub id"
    )
    assert "hf download llava-hf/llava-v1.6-mistral-7b-hf" in message
    snapshot = hf_cache("llava-hf/llava-v1.6-mistral-7b-hf", "config.json")
    assert preflight.check_model("--model", "llava-hf/llava-v1.6-mistral-7b-hf") == snapshot
    with pytest.raises(PreflightError, match=r"\(revision v2\)"):  # a revision that is not cached
        preflight.check_model("--model", "llava-hf/llava-v1.6-mistral-7b-hf", revision="v2")
    with pytest.raises(PreflightError, match="no such file or folder; pass a local model folder"):
        preflight.check_model("--vae", str(tmp_path / "missing" / "vae"))


def test_open_clip_default_resolves_only_from_the_cache(hf_cache):
    name, tag = DEFAULT_CLIP
    with pytest.raises(PreflightError) as err:
        preflight.check_open_clip("--clip-model", name, pretrained=tag, pretrained_flag="--clip-pretrained")
    message = one_line(err)
    assert message.startswith(f"--clip-model {name} --clip-pretrained {tag}: its weights are the hub file")
    assert "hf download timm/vit_large_patch14_clip_224.openai" in message and "local-dir:PATH" in message
    hf_cache("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    found = preflight.check_open_clip(
        "--clip-model", name, pretrained=tag, pretrained_flag="--clip-pretrained"
    )
    assert found.endswith("open_clip_model.safetensors")


def test_open_clip_names(tmp_path, hf_cache):
    flags = {"pretrained_flag": "--clip-pretrained"}
    with pytest.raises(PreflightError, match="is not an open_clip model"):
        preflight.check_open_clip("--clip-model", "ViT-Q-99", pretrained="openai", **flags)
    with pytest.raises(
        PreflightError, match=r"--clip-pretrained 'laion9b' is neither .* pass one of \['openai'"
    ):
        preflight.check_open_clip("--clip-model", "ViT-L-14-quickgelu", pretrained="laion9b", **flags)
    assert preflight.check_open_clip("--clip-model", "ViT-B-32", pretrained=None, **flags) == "ViT-B-32"
    with pytest.raises(PreflightError, match="has no open_clip_config.json"):
        preflight.check_open_clip("--clip-model", f"local-dir:{tmp_path}", pretrained="openai", **flags)
    with pytest.raises(PreflightError, match="not in the local HF cache"):
        preflight.check_open_clip("--clip-model", "hf-hub:org/clip", pretrained=None, **flags)


def test_captioning_cli_fails_fast_on_a_missing_run(tmp_path, capsys):
    """`captioning/run.py --input /nonexistent` used to succeed with 0 rows and create folders."""
    from captioning.cli import main

    missing = tmp_path / "nonexistent"
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(missing), "--model", "llava-hf/llava-v1.6-mistral-7b-hf", "--tokenizer", "t5"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: --input '{missing}' is not a folder: pass the --output folder of a curation run"
    ]
    assert not missing.exists()


def test_curation_cli_names_the_clip_flags_when_the_default_is_not_cached(tmp_path, hf_cache, capsys):
    from curation.run import main

    (tmp_path / "corpus").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --clip-model ViT-L-14-quickgelu --clip-pretrained openai: its weights are")
    assert not (tmp_path / "run").exists()

"""Prompt files (COCO-30K / MJHQ-30K style): rows as written, each bad line refused with its number."""

from __future__ import annotations

import json

import pytest

from manifests.buckets import nearest_bucket
from training.prompt_files import read_prompt_file
from training.sample import plan_jobs


def _jsonl(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_rows_with_ids_seeds_and_sizes(tmp_path):
    path = _jsonl(
        tmp_path,
        '{"prompt": "a cat", "id": 7, "seed": 42, "category": "animals"}',
        "",
        '{"prompt": "a wide castle", "id": "c1", "width": 1024, "height": 512}',
        '{"prompt": "a tall tower", "aspect": "16:9"}',
    )
    rows = read_prompt_file(path)
    assert rows == [
        {"prompt": "a cat", "key": "7", "seed": 42, "category": "animals"},
        {"prompt": "a wide castle", "key": "c1", "width": 1024, "height": 512},
        {"prompt": "a tall tower", "aspect": "16:9"},
    ]
    jobs = plan_jobs(rows, resolution=256, seed=100, num_images_per_prompt=2)
    # a row's seed is its own (+ j per image); the others get --seed + index
    assert [j.seed for j in jobs] == [42, 43, 102, 103, 104, 105]
    assert [j.file_name for j in jobs] == ["7-0.png", "7-1.png", "c1-0.png", "c1-1.png", "000004.png", "000005.png"]
    assert [(j.height, j.width) for j in jobs[::2]] == [
        nearest_bucket(1, 1, 256), nearest_bucket(512, 1024, 256), nearest_bucket(16, 9, 256)
    ]  # fmt: skip
    assert (jobs[2].height, jobs[2].width) != (jobs[4].height, jobs[4].width)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "a", "id": "x"', "line 2: not JSON"),
        ('["a cat"]', "line 2: expected a JSON object, got list"),
        ('{"text": "a cat"}', "line 2: no string 'prompt'"),
        ('{"prompt": 3}', "line 2: no string 'prompt'"),
        ('{"prompt": "a", "seed": -1}', "line 2: 'seed' must be an integer >= 0"),
        ('{"prompt": "a", "seed": 1.5}', "line 2: 'seed' must be an integer >= 0"),
        ('{"prompt": "a", "width": 512}', "line 2: 'width' and 'height' go together"),
        ('{"prompt": "a", "width": 0, "height": 5}', "line 2: 'width' and 'height' must be positive"),
        ('{"prompt": "a", "aspect": "wide"}', "line 2: aspect ratio must look like H:W"),
        ('{"prompt": "a", "aspect": "1:1", "width": 4, "height": 4}', "line 2: give 'aspect' or"),
        ('{"prompt": "a", "id": true}', "line 2: 'id' must be a non-empty string or an integer"),
        ('{"prompt": "a", "id": "k0"}', "line 2: id 'k0' already on line 1"),
        ('{"prompt": "a", "prompt": "b"}', "line 2: 'prompt' appears twice in one object"),
    ],
)
def test_a_bad_line_is_refused_with_its_number_and_reason(tmp_path, line, reason):
    path = _jsonl(tmp_path, '{"prompt": "ok", "id": "k0"}', line)
    with pytest.raises(ValueError, match=f"prompts.jsonl: {reason}"):
        read_prompt_file(path)


def test_mjhq_meta_data_json(tmp_path):
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps({"f3a1": {"prompt": "a cat", "category": "animals"},
                                "09bc": {"prompt": "a city", "category": "places"}}))  # fmt: skip
    assert read_prompt_file(path) == [
        {"prompt": "a cat", "category": "animals", "key": "f3a1"},
        {"prompt": "a city", "category": "places", "key": "09bc"},
    ]
    path.write_text(json.dumps({"f3a1": {"category": "animals"}}))
    with pytest.raises(ValueError, match="meta_data.json: entry 'f3a1': no string 'prompt'"):
        read_prompt_file(path)
    # an id twice: json.loads would keep the last entry and lose a prompt without a word
    path.write_text('{"f3a1": {"prompt": "a cat"}, "09bc": {"prompt": "a city"}, "f3a1": {"prompt": "a dog"}}')
    with pytest.raises(ValueError, match="meta_data.json: 'f3a1' appears twice"):
        read_prompt_file(path)


def test_the_format_is_read_from_the_suffix_in_any_case(tmp_path):
    (tmp_path / "P.JSONL").write_text('{"prompt": "a cat", "id": "c"}\n')
    assert read_prompt_file(tmp_path / "P.JSONL") == [{"prompt": "a cat", "key": "c"}]  # not the JSON text
    (tmp_path / "META_DATA.JSON").write_text('{"c": {"prompt": "a cat"}}')
    assert read_prompt_file(tmp_path / "META_DATA.JSON") == [{"prompt": "a cat", "key": "c"}]


def test_plain_text_and_empty_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompt_file(tmp_path / "p.txt") == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(tmp_path / "e.jsonl")


@pytest.mark.parametrize(
    ("rows", "per_prompt"),
    [
        ([{"prompt": "a", "key": "a/b"}, {"prompt": "b", "key": "a_b"}], 1),  # equal once sanitised
        ([{"prompt": "a", "key": "café"}, {"prompt": "b", "key": "caf_"}], 2),  # non-ASCII sanitised too
        ([{"prompt": "a"}, {"prompt": "b", "key": "000000"}], 1),  # an unnamed row's index name
    ],
)
def test_two_images_never_share_a_file(rows, per_prompt):
    """Every planned image has its own file, or the plan is refused (else one PNG silently replaces another
    and two rows point at it)."""
    with pytest.raises(ValueError, match=r"would both be written to .*\.png"):
        plan_jobs(rows, resolution=256, seed=0, num_images_per_prompt=per_prompt)
    distinct = [{**row, "key": f"{row.get('key', 'r')}{i}"} for i, row in enumerate(rows)]
    jobs = plan_jobs(distinct, resolution=256, seed=0, num_images_per_prompt=per_prompt)
    assert len({j.file_name for j in jobs}) == len(jobs) == len(rows) * per_prompt

"""Prompt files for sampling and evaluation: JSONL rows, MJHQ-30K's ``meta_data.json``, or one prompt per line.

A JSONL line is ``{"prompt": str}`` with, optionally, ``"id"`` (or ``"key"``: names the image file and ties it to
an eval-set row), ``"seed"`` (the image's seed; else ``--seed`` + index), and a size: ``"width"`` + ``"height"``
(the bucket nearest to that aspect) or ``"aspect": "H:W"``. Other fields (``category``, ``tier``…) ride along.
This is the shape of COCO-30K / MJHQ-30K prompt lists (PixArt-Σ evaluates on 30K prompts, arXiv 2403.04692 §4).
A ``.json`` file is MJHQ-30K's ``meta_data.json``: ``{id: {"prompt": str, "category": str}, …}``. Any other
suffix: one prompt per non-empty line. A bad line is refused with its number and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path


def parse_aspect(text: str) -> tuple[int, int]:
    """``"H:W"`` → (H, W), both positive integers."""
    try:
        h, w = (int(v) for v in text.split(":"))
    except (ValueError, AttributeError) as error:
        raise ValueError(f"aspect ratio must look like H:W (e.g. 9:16), got {text!r}") from error
    if h < 1 or w < 1:
        raise ValueError(f"aspect ratio must be positive, got {text!r}")
    return h, w


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_row(row: object) -> dict:
    """One prompt record, checked and normalised (``id`` → ``key``, a str); raises ValueError with the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str):
        raise ValueError("no string 'prompt'")
    row = dict(row)
    if "id" in row:
        if "key" in row and row["key"] != row["id"]:
            raise ValueError(f"'id' {row['id']!r} and 'key' {row['key']!r} disagree")
        row["key"] = row.pop("id")
    if "key" in row:
        if isinstance(row["key"], bool) or not isinstance(row["key"], str | int) or row["key"] == "":
            raise ValueError(f"'id' must be a non-empty string or an integer, got {row['key']!r}")
        row["key"] = str(row["key"])
    if "seed" in row and not (_positive_int(row["seed"]) or row["seed"] == 0):
        raise ValueError(f"'seed' must be an integer >= 0, got {row['seed']!r}")
    if ("width" in row) != ("height" in row):
        raise ValueError("'width' and 'height' go together")
    if "width" in row and not (_positive_int(row["width"]) and _positive_int(row["height"])):
        raise ValueError(
            f"'width' and 'height' must be positive integers, got {row['width']!r}, {row['height']!r}"
        )
    if "aspect" in row:
        if "width" in row:
            raise ValueError("give 'aspect' or 'width'/'height', not both")
        parse_aspect(row["aspect"])
    return row


def _check_unique(rows: list[dict], where: list[str], path: Path) -> None:
    first: dict[str, str] = {}
    for row, place in zip(rows, where, strict=True):
        key = row.get("key")
        if key is not None and key in first:
            raise ValueError(f"{path}: {place}: id {key!r} already on {first[key]}")
        if key is not None:
            first[key] = place


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a key given twice is refused (``json`` would keep the last one only)."""
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"{key!r} appears twice in one object (JSON keeps only the last: a value would be lost)")
        data[key] = value
    return data


def read_jsonl(path: Path) -> list[dict]:
    rows, where = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(check_row(json.loads(line, object_pairs_hook=_unique_keys)))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: line {number}: not JSON ({error.msg} at column {error.colno})"
            ) from None
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: {error}") from None
        where.append(f"line {number}")
    _check_unique(rows, where, path)
    return rows


def read_meta_data(path: Path) -> list[dict]:
    """MJHQ-30K's ``meta_data.json``: one entry per image id, in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    except ValueError as error:  # a repeated key (_unique_keys)
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected MJHQ's {{id: {{'prompt': …}}}} object, got a {type(data).__name__}"
        )
    rows = []
    for key, entry in data.items():
        try:
            rows.append(check_row({**entry, "id": key} if isinstance(entry, dict) else entry))
        except ValueError as error:
            raise ValueError(f"{path}: entry {key!r}: {error}") from None
    return rows


def read_prompt_file(path: str | Path) -> list[dict]:
    """Prompt rows (``prompt``; ``key``, ``seed``, ``width``/``height`` or ``aspect`` when given) in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()  # PROMPTS.JSONL is JSONL too, not one JSON text per prompt
    if suffix == ".jsonl":
        rows = read_jsonl(path)
    elif suffix == ".json":
        rows = read_meta_data(path)
    else:
        rows = [
            {"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows

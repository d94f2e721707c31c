"""Checks of what a user hands the jobs: names that become folders, and SQL filters that become queries.

A ``--where`` is one boolean expression over one view, never a statement: it is parsed by DuckDB as
``SELECT * FROM <view> WHERE (<expr>)`` and refused unless that text is exactly one SELECT of this shape,
with no comment, parameter, table function or table other than the manifest views. The query that runs
embeds that checked SELECT whole, as a subquery, so the expression cannot reach past its parentheses;
and it runs on a connection that may read only the manifest files (``manifests.db.restrict``).

Errors a user can fix are ``InputError`` (a ``ValueError``) with a one-line message naming the flag;
``cli`` turns them into that one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

# Views a --where may name in a subquery (besides its own): every view manifests.connect creates, and the
# excluded selections of manifests.selection.
VIEWS = frozenset(
    {
        "images",
        "captions",
        "clip_embeddings",
        "rejects",
        "image_captions",
        "shards",
        "train_shards",
        "excluded",
    }
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_CHARS = 128
_WHERE_EXAMPLE = "e.g. \"tier = '4k' AND aesthetic >= 5.5\""


class InputError(ValueError):
    """Bad user input (a flag, a name, a filter, an empty result): the message is one line naming the fix."""


def one_line(text: object, limit: int = 300) -> str:
    """The first line of ``text`` (DuckDB errors carry a caret diagram below), at most ``limit`` characters."""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def squeeze(text: str, limit: int = 120) -> str:
    """``text`` with every run of whitespace (newlines included) as one space, at most ``limit`` characters."""
    return one_line(" ".join(text.split()), limit)


def check_name(name: str, *, flag: str = "--name") -> str:
    """Return ``name`` if it is a safe folder name: letters, digits, ``.``, ``_``, ``-``; no ``..``.

    Every name that becomes a folder under a run (selections, eval sets, training shards) goes through
    here, so ``../../x`` or ``a/b`` never writes outside the run.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or len(name) > MAX_NAME_CHARS:
        raise InputError(
            f"{flag} {name!r} is not a plain folder name: use letters, digits, '.', '_' and '-' "
            f"(no '/', no '..', at most {MAX_NAME_CHARS} characters, not starting with '.' or '-')"
        )
    return name


def where_subquery(view: str, where: str) -> str:
    """The SELECT a checked ``where`` runs as (the exact text ``check_where`` parsed)."""
    return f"SELECT * FROM {view} WHERE ({where})"


def _serialize(sql: str) -> dict:
    import duckdb

    con = duckdb.connect()  # parsing only: json_serialize_sql neither binds nor runs anything
    try:
        return json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    finally:
        con.close()


def _strip_locations(node: object) -> object:
    if isinstance(node, dict):
        return {k: _strip_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_strip_locations(v) for v in node]
    return node


@functools.lru_cache(maxsize=16)
def _reference_shape(view: str) -> str:
    """The parsed ``SELECT * FROM <view> WHERE (true)`` without its WHERE: what every filter must look like."""
    node = _serialize(where_subquery(view, "true"))["statements"][0]["node"]
    return json.dumps(
        _strip_locations({k: v for k, v in node.items() if k != "where_clause"}), sort_keys=True
    )


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def check_where(where: str, *, view: str, flag: str = "--where") -> str:
    """Return ``where`` (stripped) if it is one boolean expression over ``view``; else ``InputError``.

    Refused: anything that makes ``SELECT * FROM <view> WHERE (<where>)`` more or other than one such
    SELECT (``;``, a second statement, ``UNION``, ``ORDER BY``/``LIMIT``, a closing parenthesis that
    escapes), comments, ``?``/``$n`` parameters, table functions (``read_csv(…)``, ``query(…)``) and
    tables other than the manifest views, even inside a subquery.
    """
    if not isinstance(where, str) or not where.strip():
        raise InputError(
            f"{flag} is empty: give a DuckDB boolean expression over the {view} view, {_WHERE_EXAMPLE}"
        )
    import duckdb

    where = where.strip()
    bad = f"{flag} {squeeze(where)!r} is not one boolean expression over the {view} view"
    try:
        tokens = duckdb.tokenize(where)
    except duckdb.Error as err:
        raise InputError(f"{bad}: {one_line(err)}") from err
    if any(kind == duckdb.token_type.comment for _, kind in tokens):
        raise InputError(f"{bad}: comments are not allowed")
    parsed = _serialize(where_subquery(view, where))
    if parsed.get("error"):
        raise InputError(f"{bad}: {one_line(parsed.get('error_message', 'it does not parse'))}")
    statements = parsed["statements"]
    if len(statements) != 1:
        raise InputError(f"{bad}: it reads as {len(statements)} statements")
    node = statements[0]["node"]
    shape = json.dumps(
        _strip_locations({k: v for k, v in node.items() if k != "where_clause"}), sort_keys=True
    )
    if shape != _reference_shape(view):
        raise InputError(f"{bad}: it changes the query around it (a parenthesis closes early?)")
    for item in _walk(node["where_clause"]):
        if item.get("class") == "PARAMETER":
            raise InputError(f"{bad}: parameters (? or $n) are not allowed")
        if item.get("type") == "TABLE_FUNCTION":
            raise InputError(f"{bad}: table functions (read_csv, read_parquet, query, …) are not allowed")
        if item.get("type") == "BASE_TABLE" and item.get("table_name") not in VIEWS:
            raise InputError(
                f"{bad}: a subquery may read only the views {sorted(VIEWS)}, not {item.get('table_name')!r}"
            )
    return where


F = TypeVar("F", bound=Callable[..., object])


def cli(main: F) -> F:
    """Wrap a CLI ``main``: an ``InputError`` becomes one line on stderr and exit status 1, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {squeeze(str(err), 2000)}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]

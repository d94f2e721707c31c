"""The end-of-run summary: what came in, what was kept, captioned, selected and trained, and where it lies.

CLI: ``python -m manifests.summary --input OUT/run [--train OUT/train]``. Reads only files (manifests,
selection records, the trainer's metrics.jsonl), so it imports no stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from manifests.checks import cli
from manifests.db import connect
from manifests.selection import SELECTIONS_DIR


def summarize(root: str | Path, train_dir: str | Path | None = None) -> dict:
    """Counts from the manifests under ``root`` and, when given, the training run's first/last loss."""
    root = Path(root)
    con = connect(root)
    one = lambda sql: con.execute(sql).fetchall()[0][0]  # noqa: E731
    summary: dict = {
        "inputs": one("SELECT count(*) FROM images"),
        "kept_per_tier": dict(
            con.execute(
                "SELECT tier, count(*) FROM images WHERE status = 'kept' GROUP BY 1 ORDER BY 1"
            ).fetchall()
        ),
        "rejected_per_reason": dict(
            con.execute(
                "SELECT split_part(reason, ':', 1), count(*) FROM rejects GROUP BY 1 ORDER BY 1"
            ).fetchall()
        ),
        "captions_kept": one("SELECT count(*) FROM captions WHERE status = 'kept'"),
        "captions_rejected": one("SELECT count(*) FROM captions WHERE status = 'rejected'"),
        "selections": {},
        "outputs": {"manifests": str(root / "manifests"), "curated_shards": str(root / "shards")},
    }
    if (root / "report" / "index.html").exists():
        summary["outputs"]["curation_report"] = str(root / "report" / "index.html")
    for record in sorted((root / SELECTIONS_DIR).glob("*/selection.json")):
        summary["selections"][record.parent.name] = json.loads(record.read_text())["num_rows"]
    for shards in sorted((root / "train_shards").glob("*/shards.json")):
        info = json.loads(shards.read_text())
        summary["outputs"][f"train_shards/{shards.parent.name}"] = (
            f"{shards.parent} ({info['num_shards']} shards, features: {info['features']})"
        )
    for record in sorted((root / "eval_shards").glob("*/eval.json")):
        strata = json.loads(record.read_text())["strata"]
        summary["outputs"][f"eval_shards/{record.parent.name}"] = (
            f"{record.parent} ({sum(s['num_selected'] for s in strata)} images, prompts.jsonl)"
        )
    if train_dir is not None:
        metrics = [
            json.loads(line) for line in (Path(train_dir) / "metrics.jsonl").read_text().splitlines() if line
        ]
        summary["training"] = {
            "steps": len(metrics),
            "stages": list(dict.fromkeys(m["stage"] for m in metrics)),
            "first_loss": metrics[0]["loss"] if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None,
        }
        summary["outputs"]["train_run"] = str(train_dir)
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"inputs:              {summary['inputs']}",
        f"kept per tier:       {summary['kept_per_tier']}",
        f"rejected per reason: {summary['rejected_per_reason']}",
        f"captions written:    {summary['captions_kept']} kept, {summary['captions_rejected']} rejected",
        f"rows selected:       {summary['selections']}",
    ]
    if "training" in summary:
        t = summary["training"]
        lines.append(
            f"training:            {t['steps']} steps over {t['stages']}, loss {t['first_loss']:.4f} → {t['last_loss']:.4f}"
        )
    lines.append("outputs:")
    lines += [f"  {name:<22} {where}" for name, where in summary["outputs"].items()]
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder")
    parser.add_argument("--train")
    parser.add_argument("--output", help="also write the summary here as JSON")
    args = parser.parse_args(argv)
    summary = summarize(args.input, args.train)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))


if __name__ == "__main__":
    main()

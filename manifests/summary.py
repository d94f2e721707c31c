"""The end-of-run summary: what came in, what was kept, captioned, selected and trained, and where it lies.

CLI: ``python -m manifests.summary --input OUT/run [--train OUT/train] [--samples DIR]``. Reads only files
(manifests, selection records, the trainer's metrics.jsonl, evaluations' metrics.json, a sampling run's
images.jsonl), so it imports no stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from manifests.checks import cli
from manifests.db import connect
from manifests.selection import SELECTIONS_DIR


def summarize(
    root: str | Path, train_dir: str | Path | None = None, samples_dir: str | Path | None = None
) -> dict:
    """Counts from the manifests under ``root``; when given, the training run's first/last loss and its
    evaluations (``<train>/eval/<name>/metrics.json``), and a sampling run's images (``images.jsonl``)."""
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
            # the last logged step, counted over every stage (metrics.jsonl: one line per log.every steps and
            # each stage's last)
            "steps": metrics[-1]["global_step"] if metrics else 0,
            "stages": list(dict.fromkeys(m["stage"] for m in metrics)),
            "first_loss": metrics[0]["loss"] if metrics else None,
            "last_loss": metrics[-1]["loss"] if metrics else None,
        }
        summary["outputs"]["train_run"] = str(train_dir)
        _add_evaluations(summary, Path(train_dir))
    if samples_dir is not None:
        rows = (Path(samples_dir) / "images.jsonl").read_text().splitlines()
        summary["outputs"]["samples"] = f"{samples_dir} ({len(rows)} images, images.jsonl)"
    return summary


def _add_evaluations(summary: dict, train_dir: Path) -> None:
    """FID / CLIP score of every evaluation under ``<train>/eval/<name>/`` (training/evaluate.py's files)."""
    for metrics_file in sorted((train_dir / "eval").glob("*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        summary.setdefault("evaluation", {})[metrics_file.parent.name] = {
            "fid": m["fid"], "clip_score": m["clip_score"], "num_images": m["num_images"], "model": m["model"],
            "fid_small_n": m.get("fid_small_n", False), "fid_note": m.get("fid_note"),
            # toy-world eval sets: prompt adherence, its chance level on these images, the real images' own
            **{k: m[k] for k in ("adherence", "adherence_shifted", "adherence_real") if k in m},
        }  # fmt: skip
        summary["outputs"][f"eval/{metrics_file.parent.name}"] = (
            f"{metrics_file.parent} (metrics.json, clip_scores.parquet, index.html, images/)"
        )


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
    for name, e in summary.get("evaluation", {}).items():
        # the note evaluate.py stored beside the FID (e.g. "trend only: fewer than 2048 images per side")
        small = f" [FID {e['fid_note']}]" if e.get("fid_note") else ""
        lines.append(
            f"evaluation {name + ':':<9} FID {e['fid']:.3f}, CLIP score {e['clip_score']:.3f} ({e['num_images']} images)"
            + small
        )
        if "adherence" in e:  # toy-world prompts (training.adherence): the model, its chance level, the real images
            lines.append(f"  adherence {name + ':':<9} {_scores(e['adherence'])}")
            for key, label in (("adherence_shifted", "vs shifted prompts (chance)"), ("adherence_real", "real images")):
                if key in e:
                    lines.append(f"    {label + ':':<28} {_scores(e[key])}")
            if "adherence_shifted" in e:  # how far above its own chance level the model draws
                margin = {k: v - e["adherence_shifted"][k] for k, v in e["adherence"].items()}
                lines.append(f"    {'margin:':<28} " + ", ".join(f"{k} {v:+.2f}" for k, v in margin.items()))
    lines.append("outputs:")
    lines += [f"  {name:<22} {where}" for name, where in summary["outputs"].items()]
    return "\n".join(lines)


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in scores.items())


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder")
    parser.add_argument("--train", help="training run folder (its eval/<name>/ evaluations are listed too)")
    parser.add_argument("--samples", help="a sampling output folder (python -m training.sample --output)")
    parser.add_argument("--output", help="also write the summary here as JSON")
    args = parser.parse_args(argv)
    summary = summarize(args.input, args.train, args.samples)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))


if __name__ == "__main__":
    main()

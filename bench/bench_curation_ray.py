"""Curation vs img2dataset on the same ≥ 1,000 mixed-size images, wall time with start-up, in one run.

    python -m bench.bench_curation_ray [--num-images 1000]

Both get the whole machine. Ours: `python curation/run.py` twice, with `--executor auto` (the default; no
RAY_ADDRESS and ≤ 2,000 input files: every phase in this process) and with `--executor ray` (Ray started
in-process: scan tasks, one tiny-CLIP scorer actor, the partitioned phases as tasks); img2dataset downloads
the same files from a loopback HTTP server with as many processes as cores. Each tool also runs on a
one-image input (the faster of a run before and one after the measured run): that fixed cost (interpreter,
imports, Ray start, actor and model load, task warm-up) gives the per-image rate net of start-up, and with it
the size where Ray starts to pay off (``CurationConfig.auto_local_max_inputs``). Writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.bench_curation import lscpu_model
from bench.record import write_section
from curation.config import CurationConfig
from curation.demo_corpus import render_procedural
from curation.tiny import build_tiny_clip

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, num: int) -> list[Path]:
    """``num`` distinct pictures (demo-corpus renders + sensor-like noise, JPEG q90) in a web-like size mix:
    80 % short side below 1K, 15 % 1K–1.6K, 5 % 3840×2160."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num):
        u = rng.random()
        if u < 0.05:
            size = (3840, 2160)
        else:
            short = int(rng.integers(200, 1000)) if u < 0.85 else int(rng.integers(1024, 1600))
            size = (int(short * rng.uniform(1.0, 1.8)), short)
        image, _, _ = render_procedural(size, rng)
        pixels = np.asarray(image, np.int16) + rng.normal(0, 4, (size[1], size[0], 1)).astype(np.int16)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def curation_run(inputs: Path, out: Path, clip: Path, executor: str) -> tuple[float, dict]:
    """Wall seconds of the CLI (no RAY_ADDRESS: Ray, if any, started in-process) and its summary."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "curation/run.py", "--input", str(inputs), "--output", str(out),
               "--clip-model", f"local-dir:{clip}", "--min-aesthetic", "none", "--no-report",
               "--no-semantic-dedup", "--executor", executor]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start, json.loads((out / "curation_summary.json").read_text())


def timed_pair(one: Path, many: Path, root: Path, clip: Path, executor: str) -> dict:
    """The one-image run before and after the ``many`` run (the faster counts), and the ``many`` run."""
    fixed, one_summary = curation_run(one, root / f"out-one-a-{executor}", clip, executor)
    seconds, summary = curation_run(many, root / f"out-{executor}", clip, executor)
    again, again_summary = curation_run(one, root / f"out-one-b-{executor}", clip, executor)
    if again < fixed:
        fixed, one_summary = again, again_summary
    return {"fixed": fixed, "seconds": seconds, "summary": summary, "one_summary": one_summary}


def img2dataset_run(paths: list[Path], root: Path, port: int, out: Path, processes: int) -> float:
    urls = root / f"urls-{out.name}.txt"
    urls.write_text("".join(f"http://127.0.0.1:{port}/{p.relative_to(root)}\n" for p in paths))
    code = (
        "from img2dataset import download; "
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, output_format='webdataset', "
        f"resize_mode='no', skip_reencode=True, min_image_size=1024, processes_count={processes}, "
        "thread_count=16, enable_wandb=False, disallowed_header_directives=[])"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    root = Path(tempfile.mkdtemp(prefix="bench_curation_ray_"))
    try:
        paths = make_images(root / "images", args.num_images)
        one = root / "one"  # a kept (≥ 1K) picture, so the one-image run also starts a shard writer
        one.mkdir()
        first_kept = next(p for p in paths if min(Image.open(p).size) >= 1024)
        shutil.copy(first_kept, one / first_kept.name)
        clip = build_tiny_clip(root / "models")
        for path in paths:  # page cache
            path.read_bytes()
        load = [os.getloadavg()[0]]
        ours = {ex: timed_pair(one, root / "images", root, clip, ex) for ex in ("auto", "ray")}
        load.append(os.getloadavg()[0])
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            port = int(server.stdout.readline().split("port ")[1].split()[0])
            i2d_fixed = img2dataset_run(paths[:1], root, port, root / "i2d-one-a", cores)
            i2d = img2dataset_run(paths, root, port, root / "i2d", cores)
            i2d_fixed = min(i2d_fixed, img2dataset_run(paths[:1], root, port, root / "i2d-one-b", cores))
        finally:
            server.terminate()
        load.append(os.getloadavg()[0])
        results = {
            "images": len(paths), "cores": cores, "ours": ours, "i2d_fixed": i2d_fixed, "i2d": i2d, "load": load,
        }  # fmt: skip
        md = render(results, args)
        print(md)
        if not args.no_write:
            write_section("curation-ray", md)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def per_image(run: dict, n: int) -> float:
    """Seconds per image net of the fixed cost (the one-image run)."""
    return (run["seconds"] - run["fixed"]) / max(n - 1, 1)


def break_even(local: dict, ray: dict, n: int) -> float:
    """Inputs above which Ray's run beats the in-process one on this machine, from both runs' measured fixed
    costs and per-image times (both scan on every core: Ray tasks, or the local executor's process pool)."""
    saved = per_image(local, n) - per_image(ray, n)
    return float("inf") if saved <= 0 else (ray["fixed"] - local["fixed"]) / saved


def render(r: dict, args: argparse.Namespace) -> str:
    n, cores, auto, ray = r["images"], r["cores"], r["ours"]["auto"], r["ours"]["ray"]

    def net(run: dict) -> float:  # images/s/core net of start-up
        return n / max(run["seconds"] - run["fixed"], 1e-3) / cores

    theirs = n / max(r["i2d"] - r["i2d_fixed"], 1e-3) / cores

    def phases(summary: dict) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds_per_phase"].items())

    rows = "\n".join(
        f"| {name} | {run['seconds']:.1f} | **{r['i2d'] / run['seconds']:.2f}×** | {run['fixed']:.1f} | "
        f"{net(run):.1f} ({net(run) / theirs:.2f}× img2dataset) |"
        for name, run in (
            (f"ours, `--executor auto` (→ {auto['summary']['executor']})", auto),
            ("ours, `--executor ray` (Ray in-process)", ray),
        )
    )
    here = break_even(auto, ray, n)
    limit = CurationConfig.auto_local_max_inputs
    late = limit * (per_image(auto, n) - per_image(ray, n)) - (ray["fixed"] - auto["fixed"])  # at the threshold

    return f"""## Curation: small jobs, in-process vs Ray vs img2dataset (wall time, start-up included)

Command: `python -m bench.bench_curation_ray --num-images {args.num_images}`

Machine: {lscpu_model()}, {cores} cores, shared with other engineers (1-minute load average
{min(r["load"]):.1f}–{max(r["load"]):.1f}). {n} distinct JPEGs (demo-corpus renders with sensor-like noise, q90; 80 % short
side < 1K, 15 % 1K–1.6K, 5 % 3840×2160), read from local files by ours, from a loopback HTTP server by
img2dataset ({cores} processes × 16 threads, `resize_mode=no`, `skip_reencode=True`, `min_image_size=1024`).
Ours: `python curation/run.py` with the tiny CLIP and the real LAION head, `--no-semantic-dedup` (a random
CLIP), same run, same images, page cache warm.

| | wall seconds, {n} images | img2dataset's wall time / ours | start-up (one-image run) | images/s/core net of start-up |
|---|---:|---:|---:|---:|
{rows}
| img2dataset | {r["i2d"]:.1f} | 1.00× | {r["i2d_fixed"]:.1f} | {theirs:.1f} |

Phases (seconds, from the summaries), auto: {phases(auto["summary"])}; ray: {phases(ray["summary"])}.
Ray's one-image run: {phases(ray["one_summary"])}. Kept {auto["summary"]["kept"]} (in-process) and
{ray["summary"]["kept"]} (Ray) of {auto["summary"]["inputs"]} (the rest below 1K or duplicates).

In-process (issue 18, item 8): no Ray import; the scan runs in a pool of one process per core, started before
the scorer loads its model, so the two overlap; the scorer runs on its actor's `num_cpus` torch threads (as on
Ray). What remains on its critical path is open_clip's import in the scorer (torch, torchvision, transformers and
timm, which open_clip imports when installed: 6.4 s of one idle core, `python -X importtime -c "import
open_clip"`) — by itself about {6.4 / r["i2d"] * 100:.0f} % of img2dataset's whole run here.

**The `--executor auto` threshold.** Ray's fixed cost here is {ray["fixed"] - auto["fixed"]:.1f} s more than
the in-process run's; per image net of start-up, in-process {per_image(auto, n) * 1000:.1f} ms, Ray
{per_image(ray, n) * 1000:.1f} ms. By that model Ray pays off above
{"never" if here == float("inf") else f"{here:,.0f}"} images on these {cores} cores;
`auto_local_max_inputs = {limit:,}` input files (sidecars count: a 1,000-image job with caption files): at that
size the in-process run is {late:+.1f} s against Ray here (+: slower). With `RAY_ADDRESS` set (`ray job submit`)
auto always uses the cluster. The machine was loaded by other engineers' test suites throughout (load average
above), so start-ups and per-image times carry that noise; img2dataset ran in the same window.
"""


if __name__ == "__main__":
    main()

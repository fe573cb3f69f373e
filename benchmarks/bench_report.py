"""`hcgen report` on a 100,000-record generation: seconds and megabytes, against `summarize` of the same run.

    .venv/bin/python benchmarks/bench_report.py [--records 100000] [--work DIR] [--per-method 12]

Builds a synthetic `hcgen generate` output with hcgen.data.lmdb_io's DatumWriter (no Caffe, no search): MNIST
test digits, 20 methods (FGS, FGV, HC-D-1..9, HC-S-1..9) x 3 scales (x1, x1.05, x1.10), as `hcgen demo`
writes them, each record the digit plus a random sparse perturbation (its hard positives scaled copies)
with metadata rows of the real columns (L2, L∞ computed; PASS a stand-in decreasing with L∞), a few
failures of each kind, and a generate.json. Then it times `hcgen.report.gallery.write_generation_report`
(fastest of --repeat) against `hcgen.data.genfolder.summarize` (the pass over the metadata that
every `hcgen generate` ends with) and prints seconds, the page's size and the ratio.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hcgen.data.lmdb_io import DatumWriter  # noqa: E402
from hcgen.data.genfolder import COLUMNS, FAILURE_COLUMNS  # noqa: E402
from hcgen.core.methods import PAPER_METHODS, parse_methods  # noqa: E402

SCALES = (1.0, 1.05, 1.10)


def synthetic_generation(out: Path, records: int, mnist: str | None = None, seed: int = 0,
                         methods: str = PAPER_METHODS, scales=SCALES, batch: int = 64) -> dict:
    """Write a synthetic generation of about `records` records into `out` (see the module docstring);
    returns its generate.json settings. Sources are MNIST test digits (`mnist`: their folder)."""
    from hcgen.data.mnist import find_mnist_dir, load_mnist

    source = str(mnist or find_mnist_dir())
    images, labels = load_mnist(source, "test")
    names = [m.name for m in parse_methods(methods)]
    n_sources = max(1, -(-records // (len(names) * len(scales))))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(images))[:n_sources])
    settings = dict(model="models/lenet/lenet_deploy.prototxt", weights="synthetic.caffemodel", source=source,
                    split="test", methods=methods, scales=",".join(f"{s:g}" for s in scales[1:]), min_pass=-1.0,
                    limit=n_sources, seed=seed, batch_size=batch, shard="0/1", preprocess="lenet")
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(settings, indent=1))
    failures = [FAILURE_COLUMNS]
    with DatumWriter(out, metadata_columns=COLUMNS) as writer:
        for b, start in enumerate(range(0, n_sources, batch)):
            idx = chosen[start:start + batch]
            x = images[idx][:, None].astype(np.int16)  # (B, 1, 28, 28)
            y = labels[idx].astype(np.int64)
            n, d = np.meshgrid(np.arange(len(idx)), np.arange(len(names)), indexing="ij")
            n, d = n.ravel(), d.ravel()
            mask = rng.random((len(n),) + x.shape[1:]) < rng.uniform(0.02, 0.3, (len(n), 1, 1, 1))
            delta = mask * rng.choice([-1, 1], mask.shape) * rng.integers(8, 120, (len(n), 1, 1, 1))
            eps = rng.uniform(0.5, 40, len(n))
            rows = {c: [] for c in COLUMNS}
            batch_images = []
            for s in scales:
                adv = np.clip(x[n] + np.rint(s * delta), 0, 255).astype(np.uint8)
                diff = (adv.astype(np.float64) - x[n]).reshape(len(n), -1)
                l2 = np.sqrt((diff ** 2).sum(1))
                linf = np.abs(diff).max(1)
                batch_images.append(adv)
                k = np.array([int(names[j].rsplit("-", 1)[1]) if names[j].startswith("HC") else 0 for j in d])
                values = {"source_index": idx[n], "batch": np.full(len(n), b), "label": y[n],
                          "method": np.array(names)[d], "k": k, "hot": np.where(k > 0, (y[n] + k) % 10, -1),
                          "scale": np.full(len(n), s), "eps": eps, "pred": (y[n] + 1 + d) % 10,
                          "pass": np.clip(1 - linf / 400 - rng.uniform(0, 0.05, len(n)), 0, 1), "aligned": np.ones(len(n), int),
                          "l2": l2, "l2_per_pixel": l2 / 784, "linf": linf}
                for c in COLUMNS:
                    rows[c] += values[c].tolist()
            if records - writer.count < len(rows["label"]):  # trim the last batch to `records`
                rows = {c: v[:max(records - writer.count, 0)] for c, v in rows.items()}
            writer.write(np.concatenate(batch_images)[:len(rows["label"])], rows["label"], rows)
            failures += [(b, int(idx[0]), "*", "", "source_misclassified"),
                         (b, int(idx[-1]), names[b % len(names)], "", "not_found")]
    with open(out / "failures.csv", "w", newline="") as f:
        csv.writer(f).writerows(failures)
    (out / "summary.json").write_text(json.dumps({"source_images": n_sources}))
    return settings


def main() -> None:
    from hcgen.report.gallery import write_generation_report
    from hcgen.data.genfolder import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic run (default: a temp dir)")
    ap.add_argument("--per-method", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        gen = work / "gen"
        t0 = time.perf_counter()
        if not (gen / "generate.json").exists():
            synthetic_generation(gen, args.records)
        print(f"synthetic generation: {gen} ({time.perf_counter() - t0:.1f} s to write or reuse)")
        base, report = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            summary = summarize(gen)
            base.append(time.perf_counter() - t0)
            written = write_generation_report(gen, work / "report.html", per_method=args.per_method)
            report.append(written.seconds)
        print(f"records: {summary['records']}; summarize: {min(base):.2f} s (fastest of {args.repeat})")
        print(f"hcgen report: {min(report):.2f} s, {written.bytes / 1e6:.2f} MB, {written.images} inlined images "
              f"({args.per_method} per method and scale); {min(report) / min(base):.1f}x summarize")


if __name__ == "__main__":
    main()

"""The same small generation + fine-tuning batch on a Dask LocalCluster with 1 and with 2 workers.

    .venv/bin/python benchmarks/bench_scale.py [--images 256] [--finetunes 4] [--iterations 300]

Stages (independent, as in the Table 1 graph): `--finetunes` fine-tunes of a base LeNet and a
generation split into 2 shards (`hcgen generate --shard K/2`). Each worker count runs in a fresh
work folder; prints wall times and the speed-up (goal on 2 cores: >= 1.8x with 2 workers).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from hcgen.stages.dask_runner import run_dask
from hcgen.experiments.table1.protocol import (MODELS, PROFILES, Stage, _finetune, caffemodel, run_sequential, stage_times,
                                   stages)


def graph(base: Path, mnist: Path, images: int, finetunes: int, iterations: int) -> dict[str, Stage]:
    """Links to the prepared base net and MNIST, then independent fine-tunes and generation shards."""
    g = {
        "base": Stage("base", lambda out: (out / "net").symlink_to(base), (), {"path": str(base)}),
        "mnist": Stage("mnist", lambda out: None, (), {"path": str(mnist)}),
        "mix": Stage("mix", lambda out: (out / "lmdb").symlink_to(mnist / "mnist_train_lmdb"), (), {}),
    }
    for i in range(finetunes):
        g[f"ft{i}"] = Stage(f"ft{i}", lambda out, b, m, _i=i: _finetune(out, b / "net", m, mnist, seed=_i,
                                                                       iterations=iterations),
                            ("base", "mix"), {"i": i})
    for k in range(2):
        g[f"gen{k}"] = Stage(f"gen{k}", lambda out, b, _k=k: _gen_shard(out, b / "net", mnist, images, _k),
                             ("base",), {"k": k})
    return g


def _gen_shard(out: Path, base: Path, mnist: Path, images: int, k: int) -> None:
    from hcgen.backends.caffe import CaffeNet
    from hcgen.generate.run import GenerateSettings, generate

    deploy = MODELS / "lenet_deploy.prototxt"
    weights = caffemodel(base)
    settings = GenerateSettings(model=str(deploy), weights=str(weights), source=str(mnist / "mnist_test_lmdb"),
                                split="test", methods="fgs,fgv,hc-d:1-9", scales="1.05", min_pass=-1.0,
                                limit=images, seed=0, batch_size=32, shard=f"{k}/2")
    generate(CaffeNet(deploy, weights), settings, out / "lmdb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--finetunes", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per worker count, interleaved; the fastest counts (this VM's speed varies)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_scale"))
    prep = stages(PROFILES["tiny"])
    prepared = run_sequential({k: prep[k] for k in ("mnist", "base1")}, root / "prep")
    base, mnist = prepared["base1"], prepared["mnist"]
    walls = {}
    g = graph(base, mnist, args.images, args.finetunes, args.iterations)
    for run, workers in [(r, w) for r in range(args.repeat) for w in (1, 2)]:
        work = root / f"w{workers}-{run}"
        t = time.perf_counter()
        run_dask(g, work, n_workers=workers)
        wall = time.perf_counter() - t
        walls[workers] = min(wall, walls.get(workers, wall))
        times = stage_times(g, work)
        busy = sum(times.values())
        print(f"{workers} worker(s), run {run + 1}: {wall:.1f} s wall "
              f"({args.finetunes} fine-tunes x {args.iterations} it + generation on {args.images} digits in 2 shards); "
              f"stages ran {busy:.1f} s in total, cluster start/stop and scheduling {wall - busy / workers:.1f} s "
              f"beyond busy/{workers}")
        print("   " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items() if v >= 0.05))
    print(f"fastest of {args.repeat}: 1 worker {walls[1]:.1f} s, 2 workers {walls[2]:.1f} s")
    print(f"speed-up with 2 workers: {walls[1] / walls[2]:.2f}x (goal >= 1.8x on 2 cores)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

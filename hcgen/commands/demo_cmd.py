"""`hcgen demo`: the default main job, no arguments needed: MNIST -> LeNet -> adversarials -> summary."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from hcgen.backends.factory import BackendSpec
from hcgen.commands.generate_cmd import print_summary
from hcgen.core.methods import PAPER_METHODS
from hcgen.data.mnist import convert_mnist
from hcgen.experiments.table1.protocol import MODELS, caffemodel
from hcgen.generate.run import GenerateSettings, generate
from hcgen.report.gallery import write_generation_report
from hcgen.training.caffe_train import train


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="small end-to-end run: MNIST LMDBs, a LeNet, FGS/FGV/HC adversarials + hard positives",
        description="Convert MNIST to LMDBs, train a LeNet with the stock solver (unless --weights is "
        "given), generate FGS, FGV, HC-D-1..9 and HC-S-1..9 adversarials and x1.05/x1.10 hard "
        "positives from --limit MNIST test digits, print the summary, and write report.html (the "
        "gallery of `hcgen report`). Everything is resumable "
        "and kept under --out (default $HCGEN_RESULTS/demo or results/demo).",
    )
    default_out = Path(os.environ.get("HCGEN_RESULTS", "results")) / "demo"
    p.add_argument("--out", default=str(default_out), help=f"output folder (default {default_out})")
    p.add_argument("--weights", default=None, help="a trained LeNet caffemodel (default: train one)")
    p.add_argument("--iterations", type=int, default=3000, help="LeNet training iterations (default 3000)")
    p.add_argument("--limit", type=int, default=200, help="MNIST test digits to attack (default 200)")
    p.add_argument("--mnist", default=None, help="folder with the MNIST IDX files (default: search path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    deploy = MODELS / "lenet_deploy.prototxt"
    net = None
    if args.weights is not None:  # opened (and checked: a bad caffemodel would abort Caffe) before steps 1-2
        net = BackendSpec(str(deploy), str(args.weights)).open()
    print(f"[1/3] MNIST -> {out / 'mnist'}")
    convert_mnist(out / "mnist", args.mnist)
    weights = args.weights
    if weights is None:
        print(f"[2/3] training LeNet for {args.iterations} iterations -> {out / 'lenet'}")
        with tqdm(total=args.iterations, desc="caffe train", unit="it", disable=None) as bar:
            def progress(event) -> None:
                bar.update(event.iteration - bar.n)
                if event.loss is not None:
                    bar.set_postfix(loss=f"{event.loss:.3f}")

            train(MODELS / "lenet_solver.prototxt", out / "lenet", seed=1, iterations=args.iterations,
                  train_lmdb=out / "mnist" / "mnist_train_lmdb", test_lmdb=out / "mnist" / "mnist_test_lmdb",
                  progress=progress)
        weights = caffemodel(out / "lenet")
    print(f"[3/3] generating from {args.limit} MNIST test digits with {weights} -> {out / 'adversarial_lmdb'}")
    if net is None:
        net = BackendSpec(str(deploy), str(weights)).open()
    settings = GenerateSettings(**net.spec.provenance(), source=str(out / "mnist" / "mnist_test_lmdb"), split="test",
                                methods=PAPER_METHODS, scales="1.05,1.10", min_pass=-1.0, limit=args.limit, seed=0,
                                batch_size=50)
    with tqdm(desc="generate", unit="img", disable=None) as bar:
        def gen_progress(n: int, total: int, stats: dict) -> None:
            bar.total = total
            bar.update(n)

        summary = generate(net, settings, out / "adversarial_lmdb", progress=gen_progress)
    print_summary(summary)
    print(f"\nrecords (Caffe Datum LMDB + metadata.csv): {out / 'adversarial_lmdb'}")
    report = write_generation_report(out / "adversarial_lmdb", out / "report.html", title="hcgen demo: LeNet / MNIST")
    print(f"report (open it in a browser): {report.path} ({report.bytes / 1e6:.1f} MB)")
    return 0

"""`hcgen train`, `hcgen mix`, `hcgen evaluate`: base nets, fine-tuning data, error rates (Sec. 5.2)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from hcgen.backends.base import PREPROCESSING
from hcgen.backends.factory import FRAMEWORKS
from hcgen.data.lmdb_io import lmdb_count
from hcgen.data.mix import mix_training_data
from hcgen.training import caffe_train as training
from hcgen.training import evaluate
from hcgen.util.fileio import atomic_write_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a net with `caffe train` (resumable)",
        description="Copy SOLVER and its net into --out with the snapshot prefix, random seed, iterations "
        "and LMDB sources filled in, and run the stock `caffe train` on them, with progress. Fine-tuning "
        "is the same with --weights (the paper: base LeNets 10,000 iterations, fine-tuning 20,000). "
        "--out keeps solver.prototxt, net.prototxt, the snapshots and train.log; rerunning the command "
        "skips a finished run and resumes an interrupted one from its latest snapshot.")
    p.add_argument("--solver", required=True, metavar="S",
                   help="solver prototxt (e.g. models/lenet/lenet_solver.prototxt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of this net")
    p.add_argument("--weights", metavar="W", help="caffemodel to fine-tune from (caffe train --weights)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="solver random_seed (default: the one of an earlier run in --out, else a random one)")
    p.add_argument("--train", metavar="LMDB", help="training LMDB (default: the net's TRAIN Data source)")
    p.add_argument("--test", metavar="LMDB", help="test LMDB (default: the net's TEST Data source)")
    p.add_argument("--iterations", type=int, metavar="N", help="max_iter (default: the solver's)")
    p.add_argument("--snapshot-every", type=int, metavar="N", help="snapshot interval (default: the solver's)")
    p.add_argument("--test-every", type=int, metavar="N",
                   help="test-phase interval (default: the solver's); tests only report, the weights do not change")
    p.add_argument("--blas-threads", type=int, default=1, metavar="N",
                   help="OPENBLAS_NUM_THREADS for caffe (default: 1, the fastest for LeNet on CPU; 0: inherit)")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "mix", help="shuffle generated LMDBs (and MNIST) into one fine-tuning LMDB",
        description="Write every selected record of the generated LMDBs, plus all of --with-mnist, exactly once "
        "to OUT in a random order fixed by --seed (Caffe's Data layer reads keys in order and never "
        "shuffles). Filters read each generated LMDB's metadata.csv. Rerunning the command resumes.")
    p.add_argument("generated", nargs="*", metavar="LMDB", help="generated LMDBs (hcgen generate)")
    p.add_argument("--out", required=True, metavar="LMDB", help="output LMDB")
    p.add_argument("--seed", type=int, required=True, help="shuffling seed (one per fine-tuned net)")
    p.add_argument("--with-mnist", metavar="LMDB",
                   help="also include this LMDB unfiltered (e.g. mnist_train_lmdb)")
    p.add_argument("--methods", metavar="M,M", help="keep only these metadata 'method' values, e.g. HC-D-1,HC-D-2")
    p.add_argument("--scales", metavar="S,S", help="keep only these metadata 'scale' values, e.g. 1,1.05")
    p.add_argument("--min-pass", type=float, metavar="TAU", help="keep records with PASS >= TAU")
    p.add_argument("--max-pass", type=float, metavar="X", help="keep records with PASS < X")
    p.set_defaults(func=run_mix)

    p = subparsers.add_parser(
        "evaluate", help="top-1 error per LMDB and per generation method",
        description="Classify every record of each LMDB with the deploy net and WEIGHTS and print the error "
        "rate per dataset and, where a metadata.csv sidecar exists, per method. Records of generated "
        "LMDBs carry the original label.")
    p.add_argument("--model", required=True, metavar="DEPLOY",
                   help="deploy prototxt (e.g. models/lenet_deploy.prototxt), or with --framework torch "
                   "FILE.py:FACTORY or a TorchScript file")
    p.add_argument("--weights", default=None, metavar="W",
                   help="trained caffemodel (required with caffe), or a torch state_dict (optional with torch)")
    p.add_argument("--framework", default="caffe", choices=FRAMEWORKS, help="default caffe")
    p.add_argument("--preprocess", default="lenet", choices=tuple(PREPROCESSING),
                   help="pixels -> net input, as in `hcgen generate` (default lenet)")
    p.add_argument("--data", required=True, nargs="+", metavar="LMDB", help="LMDBs to evaluate")
    p.add_argument("--by", default="method", metavar="COL,COL",
                   help="metadata columns to group by (default: method; e.g. method,scale)")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N", help="images per forward (default: 1000)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run_evaluate)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text is not None else None


def run_train(args: argparse.Namespace) -> int:
    bar: tqdm | None = None

    def progress(event: training.TrainProgress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event.max_iter, initial=event.iteration, unit="it", desc="caffe train", disable=None)
        bar.update(max(0, event.iteration - bar.n))
        if event.loss is not None:
            bar.set_postfix_str(f"loss {event.loss:.4g}")
        else:
            bar.write(f"iteration {event.iteration}: test " +
                      ", ".join(f"{k} = {v:.4g}" for k, v in event.test.items()))

    try:
        result = training.train(
            args.solver, args.out, weights=args.weights, seed=args.seed, train_lmdb=args.train,
            test_lmdb=args.test, iterations=args.iterations, snapshot_every=args.snapshot_every,
            test_every=args.test_every,
            blas_threads=args.blas_threads or None, progress=progress)
    except KeyboardInterrupt:
        result = None
    finally:
        if bar is not None:
            bar.close()
    if result is None:
        print(f"interrupted: caffe saved a snapshot in {args.out}; rerun the same command to resume")
        return 130
    if result.status == "skipped":
        print(f"already trained: {result.caffemodel} ({result.max_iter} iterations, seed {result.seed}); "
              "nothing to do")
        return 0
    done = result.max_iter - result.start_iter
    resumed = f", resumed at iteration {result.start_iter}" if result.status == "resumed" else ""
    loss = f", final loss {result.losses[-1][1]:.4g}" if result.losses else ""
    print(f"{result.status}: {result.caffemodel} ({done} iterations in {result.seconds:.1f} s, "
          f"{result.it_per_s:.1f} it/s{resumed}, seed {result.seed}{loss}); log: {result.log}")
    if result.tests:
        it, outputs = result.tests[-1]
        print(f"test at iteration {it}: " + ", ".join(f"{k} = {v:.4g}" for k, v in outputs.items()))
    return 0


def run_mix(args: argparse.Namespace) -> int:
    filtered = any(v is not None for v in (args.methods, args.scales, args.min_pass, args.max_pass))
    sources = list(args.generated) + ([args.with_mnist] if args.with_mnist else [])
    total = None if filtered else sum(lmdb_count(s) for s in sources)
    with tqdm(total=total, unit="rec", desc="mix", disable=None) as bar:
        count, before = mix_training_data(
            args.generated, args.out, args.seed, with_mnist=args.with_mnist, methods=_split(args.methods),
            scales=[float(s) for s in _split(args.scales)] if args.scales else None,
            min_pass=args.min_pass, max_pass=args.max_pass, progress=bar.update)
    kept = f" ({before} were already there)" if before else ""
    print(f"{args.out}: {count} records, shuffled with seed {args.seed}{kept}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    with tqdm(total=sum(lmdb_count(d) for d in args.data), unit="img", desc="evaluate", disable=None) as bar:
        results = evaluate.evaluate(args.model, args.weights, args.data, group_by=_split(args.by) or [],
                                    framework=args.framework, preprocess=args.preprocess,
                                    batch_size=args.batch_size, progress=bar.update)
    print(evaluate.format_table(results))
    if args.json:
        weights = None if args.weights is None else str(Path(args.weights).absolute())
        report = {"model": str(Path(args.model).absolute()), "weights": weights,
                  "results": [r.as_dict() for r in results]}
        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return 0

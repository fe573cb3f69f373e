"""`hcgen data mnist|infimnist`: build the Caffe LMDBs the experiments train on."""
from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from hcgen.data import infimnist, mnist
from hcgen.util.locks import folder_lock

_SOURCE_HELP = ("directory holding the four MNIST files, gzipped or not (default: $HCGEN_MNIST_DIR, "
                "../shared/data/mnist from the current directory, then from the repository root, "
                "~/.cache/hcgen/mnist, then a download into that cache)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="write MNIST / InfiMNIST-style Caffe LMDBs",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True

    p = sub.add_parser("mnist", help="mnist_train_lmdb and mnist_test_lmdb, as Caffe's convert_mnist_data")
    p.add_argument("--source", metavar="DIR", help=_SOURCE_HELP)
    p.add_argument("--out", metavar="DIR", required=True, help="directory to write the two LMDBs into")
    p.add_argument("--force", action="store_true", help="rewrite LMDBs that already exist")

    p = sub.add_parser("infimnist", help="InfiMNIST-style affine+elastic deformations (not InfiMNIST itself)")
    p.add_argument("--count", type=int, default=1_000_000, help="number of records (default: 1000000)")
    p.add_argument("--out", metavar="LMDB", required=True, help="output LMDB directory; rerunning resumes it")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--source", metavar="DIR", help=_SOURCE_HELP)
    p.add_argument("--alpha", type=float, default=infimnist.Deformation.alpha,
                   help="elastic displacement scale in pixels (default: %(default)s, Simard et al. 2003)")
    p.add_argument("--sigma", type=float, default=infimnist.Deformation.sigma,
                   help="Gaussian smoothing of the displacement field (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with folder_lock(args.out):  # one writer per output folder: a second run exits at once
        return _mnist(args) if args.dataset == "mnist" else _infimnist(args)


def _mnist(args: argparse.Namespace) -> int:
    with tqdm(total=sum(mnist.SIZES.values()), unit="img", desc="mnist -> lmdb", disable=None) as bar:
        result = mnist.convert_mnist(args.out, args.source, force=args.force, progress=bar.update)
    for split, (path, status) in result.items():
        print(f"{split}: {path} ({mnist.SIZES[split]} records, {status})")
    return 0


def _infimnist(args: argparse.Namespace) -> int:
    params = infimnist.Deformation(alpha=args.alpha, sigma=args.sigma)
    print(f"generator: {infimnist.GENERATOR}: random affine + elastic deformation (Simard et al. 2003) "
          f"of MNIST training digits, {params}")
    started = time.perf_counter()
    with tqdm(total=args.count, unit="img", desc="infimnist-style", disable=None) as bar:
        before, after = infimnist.write_infimnist(
            args.out, args.count, seed=args.seed, source=args.source, params=params,
            progress=bar.update)
    elapsed = time.perf_counter() - started
    new = after - before
    if before:
        print(f"resumed: {before} records were already present")
    rate = f", {new / elapsed:.0f} img/s" if new else ""
    print(f"{args.out}: {after} records ({new} new in {elapsed:.1f} s{rate}), generator={infimnist.GENERATOR}")
    return 0

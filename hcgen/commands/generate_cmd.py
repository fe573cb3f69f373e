"""`hcgen generate`: adversarial images and hard positives into a Caffe LMDB (+ metadata)."""
from __future__ import annotations

import argparse

from tqdm import tqdm

from hcgen.backends.base import PREPROCESSING
from hcgen.backends.factory import FRAMEWORKS, BackendSpec
from hcgen.core.methods import PAPER_METHODS
from hcgen.core.methods import parse_methods, parse_scales
from hcgen.generate.run import GenerateSettings
from hcgen.generate.run import generate
from hcgen.generate.shards import merge_shards
from hcgen.generate.shards import parse_shard
from hcgen.util.locks import folder_lock


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate adversarial images and hard positives into an LMDB",
        description="For every correctly classified source image, search the minimal adversarial "
        "image along each method's direction (FGS, FGV, hot/cold HC-D-k and HC-S-k), add hard "
        "positives (the minimal perturbation scaled by --scales), score them with PASS, and write "
        "them with their ORIGINAL labels to the LMDB folder --out (metadata.csv, failures.csv, "
        "summary.json beside the data). Rerunning the same command resumes an interrupted run.",
    )
    p.add_argument("--framework", default="caffe", choices=FRAMEWORKS,
                   help="caffe (default): --model is a deploy prototxt; torch: --model is FILE.py:FACTORY "
                   "(FACTORY() returns a torch.nn.Module) or a TorchScript file, see examples/torch_lenet.py")
    p.add_argument("--model", required=True, help="deploy prototxt (Input layer, force_backward: true), or with "
                   "--framework torch FILE.py:FACTORY or a TorchScript file")
    p.add_argument("--weights", default=None, help="trained caffemodel (required with caffe), or a torch state_dict "
                   "saved with torch.save (optional with torch)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where a torch model runs (default cpu; cuda needs a GPU that torch sees)")
    p.add_argument("--input", default=None,
                   help="source images: an LMDB of Datums, a folder of JPEG/PNG images (224x224 centre crops "
                   "of a 256x256 resize, BGR; labels from labels.txt or class subfolders, see hcgen/images.py), "
                   "or a folder with the MNIST IDX files (default: the MNIST search path, see README)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="MNIST split (default train)")
    p.add_argument("--methods", default=PAPER_METHODS,
                   help=f"comma-separated: fgs, fgv, hc-d:K, hc-s:K with K like 1-9 (default {PAPER_METHODS})")
    p.add_argument("--scales", default="1.05,1.10",
                   help="hard-positive factors > 1 applied to each minimal perturbation ('' for none)")
    p.add_argument("--min-pass", type=float, default=-1.0, metavar="TAU",
                   help="keep only records with PASS >= TAU (Eq. 5; the paper uses 0.99 on ImageNet; "
                   "default -1: keep all)")
    p.add_argument("--out", required=True, help="output LMDB folder (created; resumed if it exists)")
    p.add_argument("--limit", type=int, default=None, help="use N source images (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--batch", type=int, default=64, help="source images per batch / atomic write (default 64)")
    p.add_argument("--shard", default="0/1", metavar="K/N", help="process only batches b with b %% N == K")
    p.add_argument("--layer", default=None, help="penultimate layer (default: the input of the final Softmax; "
                   "torch: a module name of model.named_modules(), default the model's output)")
    p.add_argument("--preprocess", default="lenet", choices=tuple(PREPROCESSING),
                   help="pixels -> net input: lenet (x/256), googlenet (BGR minus 104,117,123), resnet152 "
                   "(BGR minus 103.94,116.78,123.68), torchvision (torch only: BGR -> RGB, /255, ImageNet "
                   "mean/std) (default lenet)")
    p.set_defaults(func=run)
    add_merge_parser(subparsers)


def add_merge_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge `hcgen generate --shard K/N` outputs into one LMDB",
        description="Merge the N shard outputs of `hcgen generate --shard K/N` into a new LMDB folder "
        "whose keys, Datums, metadata and failures equal those of the same generation run unsharded.",
    )
    p.add_argument("shards", nargs="+", help="the shard output folders (K = 0..N-1, any order)")
    p.add_argument("--out", required=True, help="new output folder")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    count = merge_shards(args.shards, args.out)
    print(f"merged {len(args.shards)} shards: {count} records in {args.out}")
    return 0


def print_summary(summary: dict) -> None:
    print(f"records written: {summary['records']} from {summary.get('source_images', '?')} source images")
    print(f"{'method':<10} {'records by scale':<36} failures")
    for name, entry in summary["methods"].items():
        records = ", ".join(f"{s}: {n}" for s, n in entry["records"].items()) or "-"
        failures = ", ".join(f"{s}: {n}" for s, n in entry["failures"].items()) or "-"
        print(f"{name:<10} {records:<36} {failures}")
    print(f"{'PASS':<18} {'min':>6} {'q25':>6} {'median':>6} {'q75':>6} {'max':>6}")
    for key, q in summary["pass_quantiles"].items():
        print(f"{key:<18} " + " ".join(f"{v:6.3f}" for v in q.values()))


def run(args: argparse.Namespace) -> int:
    with folder_lock(args.out):  # a second run on --out exits 2 at once, before anything is loaded
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    parse_methods(args.methods), parse_scales(args.scales), parse_shard(args.shard)  # option errors first
    spec = BackendSpec(args.model, args.weights, framework=args.framework, preprocess=args.preprocess,
                       layer=args.layer, device=args.device)
    net = spec.open()
    settings = GenerateSettings(
        **spec.provenance(), source=args.input, split=args.split, methods=args.methods, scales=args.scales,
        min_pass=args.min_pass, limit=args.limit, seed=args.seed, batch_size=args.batch, shard=args.shard,
    )
    with tqdm(desc="generate", unit="img", disable=None) as bar:
        def progress(n_images: int, total: int, stats: dict) -> None:
            bar.total = total
            bar.update(n_images)
            bar.set_postfix(records=stats["records"],
                            fwd_per_search=f"{stats['forwards'] / max(stats['searches'], 1):.1f}")

        summary = generate(net, settings, args.out, progress=progress)
    print_summary(summary)
    return 0

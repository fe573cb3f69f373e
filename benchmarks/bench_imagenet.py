"""HC-D searches on a random-weight BVLC-GoogLeNet against raw Caffe forward throughput, in one run.

Random weights (models/make_imagenet_prototxts.py fillers, seeded), N synthetic 224x224 colour images
(bicubically upsampled noise) labelled with the net's own predictions, methods HC-D-1..K. Reported:

  raw forward    images/s of bare ``caffe.Net.forward()`` at batch B (what ``caffe time`` times per
                 forward pass), and of ``CaffeNet.scores`` (+ preprocessing and copies) at the same batch,
                 best of --rounds passes timed alternately; ``--caffe-time`` adds the ``caffe time`` CLI
  directions     seconds for one forward + K B_l (``backward_from``) per image
  search         rounds, forwards per search (the clean forward not counted), seconds per search
                 (directions included), and the search's own forward rate / the raw rate: how much of
                 the search time is Caffe (the rest is the integer ray bookkeeping of hcgen.core.search)

A random net's margins and gradients are not a trained GoogLeNet's, so forwards per search here need not
match the real model's; compare it with LeNet's 5.1 (hcgen/search.py docstring) with that in mind.
Batch size barely matters on CPU: bare forward at batch 1, 2, 4, 8, 16 gave 4.3, 4.3, 4.0, 4.3, 3.9 img/s
(best of several, 2 shared cores). Usage:
  python benchmarks/bench_imagenet.py [--images 4] [--k 4] [--batch 8] [--rounds 3] [--caffe-time]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from hcgen.core import search
from hcgen.backends.caffe import GOOGLENET, CaffeNet, caffe, read_net_parameter
from hcgen.core.methods import Method
from hcgen.generate.run import compute_directions
from hcgen.training.caffe_train import caffe_executable

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "models" / "googlenet" / "deploy.prototxt"


def _make_module():
    path = REPO / "models" / "make_imagenet_prototxts.py"
    spec = importlib.util.spec_from_file_location("make_imagenet_prototxts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forward_rates(net: CaffeNet, weights: Path, images: np.ndarray, rounds: int) -> tuple[float, float]:
    """Best-of-`rounds` images/s of bare caffe.Net.forward() and of CaffeNet.scores on the same batch,
    timed alternately (one warm-up each) so that load from other processes hits both alike."""
    bare = caffe.Net(str(DEPLOY), caffe.TEST, weights=str(weights))
    bare.blobs["data"].reshape(*images.shape)
    bare.reshape()
    bare.blobs["data"].data[...] = GOOGLENET.forward(images)
    best = [np.inf, np.inf]
    for r in range(rounds + 1):
        for i, run in enumerate((bare.forward, lambda: net.scores(images))):
            started = time.perf_counter()
            run()
            if r:  # round 0 warms up
                best[i] = min(best[i], time.perf_counter() - started)
    return len(images) / best[0], len(images) / best[1]


def caffe_time_rate(root: Path, batch: int, iterations: int) -> float:
    """Images/s from the `caffe time` CLI's "Average Forward pass" on a copy of the deploy at `batch`."""
    param = read_net_parameter(DEPLOY)
    param.layer[0].input_param.shape[0].dim[0] = batch
    model = root / "deploy_time.prototxt"
    model.write_text(str(param))
    env = {**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"}
    log = subprocess.run([caffe_executable(), "time", f"--model={model}", f"--iterations={iterations}"],
                         capture_output=True, text=True, env=env, check=True).stderr
    ms = float(re.search(r"Average Forward pass: ([\d.]+) ms", log).group(1))
    return batch / (ms / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="source images (default 4)")
    parser.add_argument("--k", type=int, default=4, help="methods HC-D-1..K (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="images per Caffe forward (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed forward passes of each kind (default 3)")
    parser.add_argument("--caffe-time", action="store_true", help="also run the `caffe time` CLI (2 iterations)")
    args = parser.parse_args()
    make = _make_module()
    with tempfile.TemporaryDirectory(prefix="bench_imagenet.") as tmp:
        root = Path(tmp)
        weights = make.random_weights(DEPLOY, root / "googlenet.caffemodel", seed=0)
        net = CaffeNet(DEPLOY, weights, preprocessing=GOOGLENET, batch_size=args.batch)
        rng = np.random.default_rng(1)
        x = np.stack([cv2.resize(rng.integers(0, 256, (9, 8, 3)).astype(np.uint8), (224, 224),
                                 interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1) for _ in range(args.images)])
        threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
        print(f"BVLC-GoogLeNet, random weights, 3x224x224, batch {args.batch}, OpenBLAS threads: {threads}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

        raw, adapter = forward_rates(net, weights, np.resize(x, (args.batch,) + x.shape[1:]), args.rounds)
        print(f"raw forward   caffe.Net.forward():     {raw:6.2f} img/s ({1000 / raw:.0f} ms/img), "
              f"best of {args.rounds}")
        print(f"              CaffeNet.scores:         {adapter:6.2f} img/s ({adapter / raw:.2f} x raw)")
        if args.caffe_time:
            print(f"              `caffe time` forward:    {caffe_time_rate(root, args.batch, 2):6.2f} img/s")

        started = time.perf_counter()
        y, h = net.predict(x)
        eta, _ = compute_directions(net, x, y, h.astype(np.float64), [Method("hc-d", k) for k in range(1, args.k + 1)])
        t_dir = time.perf_counter() - started
        started = time.perf_counter()
        res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
        t_search = time.perf_counter() - started
        n = res.success.size
        forwards = int(res.forwards.sum())
        print(f"HC-D-1..{args.k} on {args.images} images = {n} searches, {int(res.success.sum())} found")
        print(f"directions    1 forward + {args.k} B_l per image: {t_dir:6.1f} s ({t_dir / args.images:.1f} s/image)")
        print(f"search        {res.rounds} rounds, {forwards / n:.1f} forwards/search, {t_search:.1f} s, "
              f"{forwards / t_search:.2f} img/s = {forwards / t_search / raw:.2f} x raw forward")
        print(f"per search    {(t_dir + t_search) / n:.2f} s (directions included), "
              f"{t_search / n:.2f} s search only; Caffe-bound estimate {forwards / n / raw:.2f} s")


if __name__ == "__main__":
    main()

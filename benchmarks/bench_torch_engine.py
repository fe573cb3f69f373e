"""The tensor-native engine (hcgen.torch.engine) against today's TorchNet + numpy path and the raw forward.

Same torch LeNet (examples/torch_lenet.py: --weights, else trained here with Caffe's LeNet solver settings,
300 iterations on 6,400 training digits), same MNIST test digits (the correctly classified ones of the first
--digits, in batches of --batch source images as `hcgen generate` does), one torch thread each, in one run:

* numpy path: `TorchNet` + `hcgen.generate.run.compute_directions` + `hcgen.core.search.adversarial_search`
  (+ `hard_positives` x1.05 with their predictions: what generate_batch does before PASS);
* tensor engine: `hcgen.torch.engine.compute_directions` + `adversarial_search` (+ `hard_positives`), the
  same work on tensors (records checked identical here);
* raw forward: ``model(preprocess(batch))`` under ``torch.no_grad`` over the very batches the engine's search
  sent to the model (same sizes, same images, same chunks of 256), i.e. the model's own throughput.

The machine may be loaded by other jobs: the three paths are interleaved batch by batch (each timed --repeat
times, the fastest counting), and every figure is given twice, in this process's CPU time (one torch thread:
the work itself, what to compare on a shared machine) and in wall time.

Printed: searches/s of both paths (a search = one (digit, method) pair), the engine's search forwards per
second against the raw forward's images/s on the same batches (the goal: >= 90%), the whole batch
(directions + search + hard positives) the same way, and the load average before and after. ``--profile``
adds where the engine's time goes (cProfile, top functions by own time).

    nice -n 19 .venv/bin/python benchmarks/bench_torch_engine.py [--digits 200] [--methods ...] [--device cpu]
"""
from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hcgen.backends.torch import TorchNet, check_device
from hcgen.core import search
from hcgen.core.methods import parse_methods
from hcgen.data.mnist import load_mnist
from hcgen.generate.run import compute_directions
from hcgen.torch import engine

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("torch_lenet_example", REPO / "examples" / "torch_lenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numpy_path(net, batches, methods, scales):
    out = []
    for x, y, h in batches:
        eta, _ = compute_directions(net, x, y, h, methods)
        res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
        hp = search.hard_positives(net.scores, x, eta, y, res, scales) if scales else None
        out.append((res, hp))
    return out


def engine_path(pm, batches, methods, scales, times=None, record=None, clocks=None):
    """The tensor engine on each batch; with `times` ({clock: {part: seconds}}) and `clocks` ({clock: fn}),
    the seconds of directions, search and hard positives are added per clock."""
    clocks = clocks or {}
    out = []
    sync = torch.cuda.synchronize if pm.device.type == "cuda" else (lambda: None)
    for x, y, h in batches:
        t0 = {c: now() for c, now in clocks.items()}
        eta, _ = engine.compute_directions(pm, x, y, h, methods)
        sync()
        t1 = {c: now() for c, now in clocks.items()}
        res = engine.adversarial_search(pm, x, eta, y, clean_scores=h, on_round=record)
        sync()
        t2 = {c: now() for c, now in clocks.items()}
        hp = engine.hard_positives(pm, x, eta, y, res, scales) if scales else None
        sync()
        t3 = {c: now() for c, now in clocks.items()}
        if times is not None:
            for c in clocks:
                times[c]["directions"] += t1[c] - t0[c]
                times[c]["search"] += t2[c] - t1[c]
                times[c]["hard_positives"] += t3[c] - t2[c]
        out.append((res, hp))
    return out


def raw_forward(pm, rounds) -> None:
    """model(preprocess(chunk)) over every recorded candidate batch, in chunks of batch_size."""
    with torch.no_grad():
        for images in rounds:
            for start in range(0, len(images), pm.batch_size):
                pm.model(pm.preprocess(images[start:start + pm.batch_size]))
    if pm.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=int, default=200, help="MNIST test digits (default 200)")
    parser.add_argument("--batch", type=int, default=64, help="source images per batch (default 64, as generate)")
    parser.add_argument("--methods", default="fgs,fgv,hc-d:1-9,hc-s:1-9")
    parser.add_argument("--scales", default="1.05", help="hard-positive factors, '' for none (default 1.05)")
    parser.add_argument("--weights", default=None, help="state_dict of examples/torch_lenet.py (default: train one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path; the fastest counts")
    parser.add_argument("--profile", action="store_true", help="also print where the engine's time goes")
    args = parser.parse_args()
    try:
        device = check_device(args.device)
    except ValueError as exc:
        sys.exit(f"bench_torch_engine.py: {exc}")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    ex = _example()
    model = ex.lenet()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    else:
        tx, ty = load_mnist(None, "train")
        torch.manual_seed(1)
        model = ex.train(model, tx[:6400, None], ty[:6400], 300, seed=1)
    model = model.eval().to(device)
    net = TorchNet(model, device=args.device)
    pm = engine.pixel_model_of(net)
    methods = parse_methods(args.methods)
    scales = [float(s) for s in args.scales.split(",") if s.strip()]

    x_all, y_all = load_mnist(None, "test")
    x_all, y_all = x_all[:args.digits, None], y_all[:args.digits].astype(np.int64)
    np_batches, t_batches = [], []
    for start in range(0, len(x_all), args.batch):
        x, y = x_all[start:start + args.batch], y_all[start:start + args.batch]
        h = net.scores(x).astype(np.float64)
        ok = h.argmax(1) == y
        np_batches.append((x[ok], y[ok], h[ok]))
        t_batches.append(tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (x[ok], y[ok], h[ok])))
    searches = sum(len(b[0]) for b in np_batches) * len(methods)

    check, per_batch_rounds = [], []  # the engine's records, and the candidate batches it sent per source batch
    for b in range(len(t_batches)):
        rec: list = []
        check += engine_path(pm, t_batches[b:b + 1], methods, scales, record=lambda r: rec.append(r.clone()))
        per_batch_rounds.append(rec)
    rounds = [r for rec in per_batch_rounds for r in rec]
    ref = numpy_path(net, np_batches, methods, scales)
    same = sum(int(((a.eps == e) | (np.isnan(a.eps) & np.isnan(e))).sum())
               for (a, _), (b, _) in zip(ref, check) for e in [b.eps.cpu().numpy()])
    identical = all(np.array_equal(a.x_adv, b.x_adv.cpu().numpy()) and np.array_equal(a.status, b.status.cpu().numpy())
                    for (a, _), (b, _) in zip(ref, check))
    search_images = sum(len(r) for r in rounds)
    hp_images = sum(int(hp.valid.sum()) for _, hp in check) if scales else 0

    # the machine's load moves (other jobs): the three paths are interleaved batch by batch, each timed
    # --repeat times per batch, and the fastest time of each (path, batch) counts
    # Each time is also taken as this process's CPU time (one torch thread: the work itself, whatever the
    # other jobs on the machine do); the CPU-time figures are the ones to compare on a loaded machine.
    totals = {clock: {"np": 0.0, "engine": 0.0, "raw": 0.0, "directions": 0.0, "search": 0.0, "hard_positives": 0.0}
              for clock in ("wall", "cpu")}
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    for b in range(len(t_batches)):
        best = {clock: {"np": np.inf, "engine": np.inf, "raw": np.inf} for clock in clocks}
        parts = {}
        for _ in range(args.repeat):
            t = {c: now() for c, now in clocks.items()}
            numpy_path(net, np_batches[b:b + 1], methods, scales)
            for c, now in clocks.items():
                best[c]["np"] = min(best[c]["np"], now() - t[c])
            times = {c: dict.fromkeys(("directions", "search", "hard_positives"), 0.0) for c in clocks}
            t = {c: now() for c, now in clocks.items()}
            engine_path(pm, t_batches[b:b + 1], methods, scales, times, clocks=clocks)
            for c, now in clocks.items():
                elapsed = now() - t[c]
                if elapsed < best[c]["engine"]:
                    best[c]["engine"], parts[c] = elapsed, times[c]
            t = {c: now() for c, now in clocks.items()}
            raw_forward(pm, per_batch_rounds[b])
            for c, now in clocks.items():
                best[c]["raw"] = min(best[c]["raw"], now() - t[c])
        for c in clocks:
            for key in ("np", "engine", "raw"):
                totals[c][key] += best[c][key]
            for key in ("directions", "search", "hard_positives"):
                totals[c][key] += parts[c][key]
    load1 = os.getloadavg()

    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s); load average {load0[0]:.2f} before, "
          f"{load1[0]:.2f} after (1 min); paths interleaved per batch, fastest of {args.repeat} each")
    print(f"{searches} searches ({len(methods)} methods x {searches // len(methods)} digits), {search_images} search "
          f"forwards in {len(rounds)} rounds, {hp_images} hard positives (x{args.scales}); records identical to the "
          f"numpy path: {identical} ({same} of {searches} eps equal)")
    for c, label in (("cpu", "CPU time of this process"), ("wall", "wall time")):
        tn, te, tr, ts = (totals[c][k] for k in ("np", "engine", "raw", "search"))
        raw_ips = search_images / tr
        print(f"-- {label}")
        print(f"{'path':<38} {'seconds':>8} {'searches/s':>11}")
        print(f"{'numpy (TorchNet + hcgen.core.search)':<38} {tn:>8.2f} {searches / tn:>11.1f}")
        print(f"{'tensor engine (hcgen.torch.engine)':<38} {te:>8.2f} {searches / te:>11.1f}   x{tn / te:.2f} the numpy path")
        print(f"  directions {totals[c]['directions']:.2f} s, search {ts:.2f} s, hard positives "
              f"{totals[c]['hard_positives']:.2f} s")
        print(f"raw forward on the search's batches: {tr:.2f} s, {raw_ips:.0f} images/s")
        print(f"search: {search_images / ts:.0f} forwards/s = {search_images / ts / raw_ips:.1%} of the raw forward")
        print(f"whole batch (directions + search + hard positives): {searches / te:.1f} searches/s, "
              f"{(searches / te) / (searches / tr):.1%} of what the raw forward of its search forwards alone allows")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        engine_path(pm, t_batches, methods, scales)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        print(buf.getvalue())


if __name__ == "__main__":
    main()

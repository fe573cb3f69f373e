"""The HC-D-9-1.05 row of Table 1 on a torch LeNet, small: base net, hard positives, fine-tune, evaluate.

1. A base LeNet (examples/torch_lenet.py) trained with Caffe's LeNet solver settings on the first
   --train-digits MNIST training digits for --base-iterations.
2. HC-D-1..9 hard positives x1.05 (the row's training images) from --sources training digits on the base net,
   with `hcgen.generate.run.generate` on a `TorchNet` (the LMDB + metadata.csv `hcgen generate` writes);
   PASS >= --min-pass if given.
3. Fine-tuning from the base weights on the training digits plus those records, read through
   `hcgen.data.torch_dataset.GeneratedDataset` by a shuffled DataLoader, learning rate restarting at 0.01 as Table 1's
   stock solver does, for --finetune-iterations.
4. Both nets evaluated on the 10,000 MNIST test digits and on a held-out adversarial set generated on the
   base net from --test-sources MNIST *test* digits (fgs, fgv, hc-d:1-9, hc-s:1; x1, x1.05, x1.10), the
   protocol of Table 1's adversarial column. Prints the two rows and writes OUT/finetune_torch.json.

    nice -n 19 .venv/bin/python scripts/finetune_torch.py --out results/finetune-torch

Everything lands in --out; rerunning reuses the finished generations (`generate` resumes).

``--online`` replaces steps 2-3 by online hard positives (`hcgen.torch.HardPositives`): at every fine-tune step
the batch's hard positives (--online-methods, --scales or --pass-band, PASS >= --min-pass) are searched on the
current weights and trained on beside the batch (at most --hp-per-step of them, a seeded choice). A progress
bar shows the loss and the hard positives kept; OUT/online.ckpt (model, optimizer, scheduler, iteration,
counts; written atomically every --checkpoint-every steps) makes a killed run resume where it was when rerun
with the same options, and the batch order and every choice derive from --seed and the step number, so a run
is repeatable (one torch thread): the same seed gives the same weights, resumed or not. Results:
OUT/online.pt and OUT/finetune_torch_online.json.

    nice -n 19 .venv/bin/python scripts/finetune_torch.py --out results/finetune-torch --online
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from hcgen.backends.torch import TorchNet
from hcgen.data.mnist import load_mnist
from hcgen.data.torch_dataset import GeneratedDataset
from hcgen.generate.run import GenerateSettings, generate
from hcgen.util.fileio import atomic_write, atomic_write_json, crash_point

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "torch_lenet.py"
HELDOUT = "fgs,fgv,hc-d:1-9,hc-s:1"


def _example():
    spec = importlib.util.spec_from_file_location("torch_lenet_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune(model: torch.nn.Module, data, iterations: int, seed: int) -> torch.nn.Module:
    """SGD as Caffe's lenet_solver (momentum 0.9, weight decay 5e-4, lr 0.01 with the "inv" policy) over a
    shuffled DataLoader of (input, label) batches of 64; returns the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    it = 0
    while it < iterations:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            if it == iterations:
                break
    return model.eval()


def _online_settings(args) -> dict:
    """What decides an online run's weights: a checkpoint of other settings is refused, not resumed."""
    keys = ("train_digits", "base_iterations", "finetune_iterations", "online_methods", "scales", "pass_band",
            "min_pass", "hp_per_step", "batch_size", "seed")
    return {k: getattr(args, k) for k in keys}


def online_finetune(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, args, out: Path) -> dict:
    """Fine-tune `model` (in place) with online hard positives at every step; resumable from OUT/online.ckpt.

    SGD as `finetune` (Caffe's lenet_solver: momentum 0.9, weight decay 5e-4, lr 0.01 "inv"); each step takes
    the next --batch-size training digits of a per-epoch permutation seeded by (--seed, epoch), adds the
    batch's hard positives on the current weights (`HardPositives`; at most --hp-per-step, a choice seeded by
    (--seed, step)) and trains on both with their original labels. Returns the run's counts."""
    from tqdm import tqdm

    from hcgen.torch import HardPositives

    ckpt = out / "online.ckpt"
    settings = _online_settings(args)
    band = tuple(args.pass_band) if args.pass_band else None
    scales = None if band else [float(v) for v in args.scales.split(",")]
    hp = HardPositives(model, methods=args.online_methods, scales=scales, tau=args.min_pass, pass_band=band,
                       pass_jobs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)
    counts = {"steps": 0, "batch_images": 0, "hard_positives_trained": 0, "kept": 0, "found": 0, "searches": 0,
              "candidates": 0, "dropped": {}, "seconds": {}, "wall": 0.0}
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state["settings"] != settings:
            changed = ", ".join(k for k in settings if state["settings"].get(k) != settings[k])
            raise SystemExit(f"{ckpt} is an online run with other settings ({changed}); rerun with its options to "
                             "resume, or use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, counts = int(state["iteration"]), state["counts"]
        print(f"resuming the online fine-tune at step {start} of {args.finetune_iterations} ({ckpt})")
    x_all = torch.from_numpy(np.array(images, dtype=np.uint8))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    bs = args.batch_size
    per_epoch = len(x_all) // bs
    if per_epoch < 1:
        raise SystemExit(f"--train-digits {len(x_all)} is smaller than one batch of {bs}")
    order, order_epoch = None, -1
    model.train()
    bar = tqdm(total=args.finetune_iterations, initial=start, unit="it", desc="online fine-tune", disable=None)
    t_run = time.perf_counter() - counts["wall"]
    for it in range(start, args.finetune_iterations):
        epoch, pos = divmod(it, per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
            order_epoch = epoch
        idx = order[pos * bs:(pos + 1) * bs]
        x, y = x_all[idx], y_all[idx]
        x_hp, y_hp = hp(x, y)
        if args.hp_per_step is not None and len(x_hp) > args.hp_per_step:
            pick = torch.randperm(len(x_hp), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + it + 1))
            pick = pick[:args.hp_per_step].sort().values
            x_hp, y_hp = x_hp[pick], y_hp[pick]
        loss = torch.nn.functional.cross_entropy(model(hp.preprocess(torch.cat([x, x_hp]).float())),
                                                 torch.cat([y, y_hp]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        s = hp.last_stats
        counts["steps"] += 1
        counts["batch_images"] += len(x)
        counts["hard_positives_trained"] += len(x_hp)
        for key in ("kept", "found", "searches", "candidates"):
            counts[key] += s[key]
        for key, v in s["dropped"].items():
            counts["dropped"][key] = counts["dropped"].get(key, 0) + v
        for key, v in s["seconds"].items():
            counts["seconds"][key] = counts["seconds"].get(key, 0.0) + v
        counts["wall"] = time.perf_counter() - t_run
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", hp=len(x_hp))
        if (it + 1) % args.checkpoint_every == 0 or it + 1 == args.finetune_iterations:
            buf = io.BytesIO()
            torch.save({"settings": settings, "iteration": it + 1, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "counts": counts}, buf)
            atomic_write(ckpt, buf.getvalue())
        crash_point("online-step")
    bar.close()
    model.eval()
    return counts


def error(net: TorchNet, images: np.ndarray, labels: np.ndarray) -> float:
    return float((net.predict(images)[0] != labels).mean()) if len(images) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work and result folder")
    parser.add_argument("--train-digits", type=int, default=10_000, help="MNIST training digits used (default 10000)")
    parser.add_argument("--base-iterations", type=int, default=2_000, help="base net iterations (default 2000)")
    parser.add_argument("--sources", type=int, default=1_000, help="training digits to generate from (default 1000)")
    parser.add_argument("--finetune-iterations", type=int, default=1_000, help="fine-tune iterations (default 1000)")
    parser.add_argument("--test-sources", type=int, default=300, help="test digits of the held-out set (default 300)")
    parser.add_argument("--min-pass", type=float, default=None, help="PASS threshold tau of the training records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    online = parser.add_argument_group("online hard positives (--online)")
    online.add_argument("--online", action="store_true", help="fine-tune with hard positives of every batch on the "
                        "current weights (hcgen.torch.HardPositives) instead of a generated set")
    online.add_argument("--online-methods", default="hc-d:1-9", help="methods (default hc-d:1-9)")
    online.add_argument("--scales", default="1.05", help="hard-positive factors (default 1.05)")
    online.add_argument("--pass-band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="per-image scale so that PASS lands in [LOW, HIGH] (e.g. 0.8 0.9) instead of --scales")
    online.add_argument("--hp-per-step", type=int, default=64, help="hard positives trained on per step at most "
                        "(a seeded choice; default 64)")
    online.add_argument("--batch-size", type=int, default=64, help="training digits per step (default 64)")
    online.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    online.add_argument("--eval-digits", type=int, default=10_000, help="MNIST test digits evaluated (default all)")
    args = parser.parse_args()
    if args.online and min(args.hp_per_step, args.batch_size, args.checkpoint_every) < 1:
        parser.error("--hp-per-step, --batch-size and --checkpoint-every must be positive")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = _example()

    train_x, train_y = load_mnist(None, "train")
    test_x, test_y = load_mnist(None, "test")
    train_x, train_y = train_x[:args.train_digits, None], train_y[:args.train_digits].astype(np.int64)
    base_file = out / "base.pt"
    if base_file.is_file():
        base = example.lenet()
        base.load_state_dict(torch.load(base_file, weights_only=True))
    else:
        torch.manual_seed(args.seed)
        base = example.train(example.lenet(), train_x, train_y, args.base_iterations, seed=args.seed)
        torch.save(base.state_dict(), base_file)
    base_net = TorchNet(base.eval())
    if args.online:
        test_x, test_y = test_x[:args.eval_digits], test_y[:args.eval_digits]
    print(f"base net: {error(base_net, test_x[:, None], test_y):.2%} MNIST test error")

    def run(name: str, **kw) -> Path:
        folder = out / name
        settings = GenerateSettings(model=f"{EXAMPLE}:lenet", weights=str(base_file), source=None, min_pass=-1.0,
                                    seed=args.seed, batch_size=64, framework="torch", **kw)
        summary = generate(base_net, settings, folder)
        print(f"{name}: {summary['records']} records from {summary['source_images']} digits")
        return folder

    if args.online:
        main_online(args, out, example, base, base_net, train_x, train_y, test_x, test_y, run)
        return
    train_gen = run("train-hc-d-9-1.05", split="train", methods="hc-d:1-9", scales="1.05", limit=args.sources)
    heldout = run("heldout", split="test", methods=HELDOUT, scales="1.05,1.10", limit=args.test_sources)

    hard = GeneratedDataset(train_gen, methods="hc-d:1-9", scales=[1.05], min_pass=args.min_pass,
                            transform=lambda x: x * 0.00390625)
    inputs = torch.from_numpy(train_x.astype(np.float32)) * 0.00390625
    digits = [(inputs[i], int(train_y[i])) for i in range(len(train_y))]  # (tensor, int) as GeneratedDataset
    tuned = example.lenet()
    tuned.load_state_dict(base.state_dict())
    tuned = finetune(tuned, ConcatDataset([digits, hard]), args.finetune_iterations, args.seed)
    torch.save(tuned.state_dict(), out / "hc-d-9-1.05.pt")

    held = GeneratedDataset(heldout)
    held_x, held_y = held.images(range(len(held))), held.labels
    rows = []
    for row, net in (("Basic LeNet", base_net), ("HC-D-9-1.05", TorchNet(tuned))):
        rows.append({"row": row, "mnist_test_error": error(net, test_x[:, None], test_y),
                     "adversarial_error": error(net, held_x, held_y),
                     "training_images": len(train_x) + (len(hard) if row != "Basic LeNet" else 0)})
    print(f"{'row':<14} {'MNIST test error':>17} {'adversarial error':>18} {'training images':>16}")
    for r in rows:
        print(f"{r['row']:<14} {r['mnist_test_error']:>17.2%} {r['adversarial_error']:>18.2%} "
              f"{r['training_images']:>16}")
    (out / "finetune_torch.json").write_text(json.dumps({"settings": vars(args), "heldout_records": len(held),
                                                        "rows": rows}, indent=1) + "\n")


def main_online(args, out: Path, example, base, base_net, train_x, train_y, test_x, test_y, run) -> None:
    """--online: fine-tune from the base weights with online hard positives, evaluate, write the results."""
    tuned = example.lenet()
    tuned.load_state_dict(base.state_dict())
    counts = online_finetune(tuned, train_x, train_y, args, out)
    torch.save(tuned.state_dict(), out / "online.pt")
    held_x = held_y = None
    if args.test_sources > 0:
        held = GeneratedDataset(run("heldout", split="test", methods=HELDOUT, scales="1.05,1.10", limit=args.test_sources))
        held_x, held_y = held.images(range(len(held))), held.labels
    name = f"online {args.online_methods}" + (f" PASS {args.pass_band[0]:g}-{args.pass_band[1]:g}" if args.pass_band
                                              else f" x{args.scales}")
    rows = []
    for row, net in (("Basic LeNet", base_net), (name, TorchNet(tuned))):
        rows.append({"row": row, "mnist_test_error": error(net, test_x[:, None], test_y),
                     "adversarial_error": error(net, held_x, held_y) if held_x is not None else None})
    print(f"{'row':<34} {'MNIST test error':>17} {'adversarial error':>18}")
    for r in rows:
        adv = f"{r['adversarial_error']:.2%}" if r["adversarial_error"] is not None else "-"
        print(f"{r['row']:<34} {r['mnist_test_error']:>17.2%} {adv:>18}")
    print(f"online fine-tune: {counts['steps']} steps, {counts['hard_positives_trained']} hard positives trained on "
          f"({counts['kept']} kept of {counts['candidates']} candidates), {counts['wall']:.0f} s")
    atomic_write_json(out / "finetune_torch_online.json", {"settings": vars(args), "rows": rows, "counts": counts})


if __name__ == "__main__":
    main()

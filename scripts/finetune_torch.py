"""The HC-D-9-1.05 row of Table 1 on a torch LeNet, small: base net, hard positives, fine-tune, evaluate.

1. A base LeNet (examples/torch_lenet.py) trained with Caffe's LeNet solver settings on the first
   --train-digits MNIST training digits for --base-iterations.
2. HC-D-1..9 hard positives x1.05 (the row's training images) from --sources training digits on the base net,
   with `hcgen.pipeline.generate.generate` on a `TorchNet` (the LMDB + metadata.csv `hcgen generate` writes);
   PASS >= --min-pass if given.
3. Fine-tuning from the base weights on the training digits plus those records, read through
   `hcgen.torch_data.GeneratedDataset` by a shuffled DataLoader, learning rate restarting at 0.01 as Table 1's
   stock solver does, for --finetune-iterations.
4. Both nets evaluated on the 10,000 MNIST test digits and on a held-out adversarial set generated on the
   base net from --test-sources MNIST *test* digits (fgs, fgv, hc-d:1-9, hc-s:1; x1, x1.05, x1.10), the
   protocol of Table 1's adversarial column. Prints the two rows and writes OUT/finetune_torch.json.

    nice -n 19 .venv/bin/python scripts/finetune_torch.py --out results/finetune-torch

Everything lands in --out; rerunning reuses the finished generations (`generate` resumes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from hcgen.mnist import load_mnist
from hcgen.pipeline.generate import GenerateSettings, generate
from hcgen.torch_data import GeneratedDataset
from hcgen.torch_net import TorchNet

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
    args = parser.parse_args()
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
    print(f"base net: {error(base_net, test_x[:, None], test_y):.2%} MNIST test error")

    def run(name: str, **kw) -> Path:
        folder = out / name
        settings = GenerateSettings(model=f"{EXAMPLE}:lenet", weights=str(base_file), source=None, min_pass=-1.0,
                                    seed=args.seed, batch_size=64, framework="torch", **kw)
        summary = generate(base_net, settings, folder)
        print(f"{name}: {summary['records']} records from {summary['source_images']} digits")
        return folder

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


if __name__ == "__main__":
    main()

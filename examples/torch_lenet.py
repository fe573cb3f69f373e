"""Caffe's LeNet (models/lenet/lenet_deploy.prototxt) as a torch.nn.Module, for `hcgen generate --framework torch`.

The modules carry the Caffe layer names (conv1, pool1, conv2, pool2, ip1, relu1, ip2), so a trained
caffemodel's parameters load by name (`hcgen.backends.torch.state_dict_from_caffe`) and ``--layer ip1`` names
the same layer in both frameworks. The output is ip2, the logits (Caffe's final Softmax "prob" is left
out: the scores are h before the softmax). Input: LeNet's ``pixels / 256``, as `TorchNet`'s default
preprocessing feeds it.

    hcgen generate --framework torch --model examples/torch_lenet.py:lenet --weights lenet.pt --out DIR
    python examples/torch_lenet.py --out lenet.pt [--iterations 2000]          # train one in torch
    python examples/torch_lenet.py --out lenet.pt --caffemodel W.caffemodel    # convert Caffe weights
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn


class LeNet(nn.Module):
    """conv1 5x5x20 - max pool 2 - conv2 5x5x50 - max pool 2 - ip1 500 - ReLU - ip2 10 (Caffe's MNIST LeNet)."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.ip1 = nn.Linear(800, 500)
        self.relu1 = nn.ReLU()
        self.ip2 = nn.Linear(500, num_classes)
        for m in (self.conv1, self.conv2, self.ip1, self.ip2):  # Caffe's xavier filler, constant 0 bias
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.weight, -np.sqrt(3 / fan_in), np.sqrt(3 / fan_in))
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.ip2(self.relu1(self.ip1(x.flatten(1))))


def lenet() -> LeNet:
    """The factory `--model examples/torch_lenet.py:lenet` calls (random weights; --weights loads them)."""
    return LeNet()


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, iterations: int, *, lr: float = 0.01,
          batch_size: int = 64, seed: int = 0, progress=None) -> nn.Module:
    """Caffe's lenet_solver.prototxt in torch: SGD momentum 0.9, weight decay 5e-4, lr policy "inv"
    (gamma 1e-4, power 0.75), batches of 64 pixel images (N, 1, 28, 28) uint8 scaled by 1/256, drawn
    in a seeded shuffled order. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)
    x_all = torch.from_numpy(np.array(images, dtype=np.float32)) * 0.00390625
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    order = torch.randperm(len(x_all), generator=gen)
    model.train()
    pos = 0
    for it in range(iterations):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x_all), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(it + 1, float(loss))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="state_dict file to write (torch.save)")
    parser.add_argument("--iterations", type=int, default=2000, help="training iterations (default 2000)")
    parser.add_argument("--caffemodel", default=None, help="copy a trained Caffe LeNet instead (needs pycaffe)")
    parser.add_argument("--mnist", default=None, help="folder with the MNIST IDX files (default: hcgen's search path)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    from hcgen.backends.torch import state_dict_from_caffe

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = lenet()
    if args.caffemodel:
        from hcgen.backends.caffe import CaffeNet
        from pathlib import Path

        deploy = Path(__file__).resolve().parents[1] / "models" / "lenet" / "lenet_deploy.prototxt"
        net = CaffeNet(deploy, args.caffemodel).net
        model.load_state_dict(state_dict_from_caffe({n: [b.data for b in net.params[n]] for n in net.params}))
    else:
        from hcgen.data.mnist import load_mnist

        images, labels = load_mnist(args.mnist, "train")
        train(model, images[:, None], labels, args.iterations, seed=args.seed,
              progress=lambda it, loss: print(f"iteration {it} loss {loss:.4f}") if it % 500 == 0 else None)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

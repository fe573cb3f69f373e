"""hcgen for PyTorch users: the tensor-native engine and online hard positives inside a training loop.

    from hcgen.torch import HardPositives
    hp = HardPositives(model, methods="hc-d:1-9", scales=(1.05,), tau=0.8)
    for x, y in loader:                      # x: integer pixels in [0, 255], (N, C, H, W); y: int64 (N,)
        x_hp, y_hp = hp(x, y)                # hard positives of this batch on the current weights
        loss = F.cross_entropy(model(hp.preprocess(torch.cat([x.float(), x_hp.float()]))), torch.cat([y, y_hp]))

`hcgen.torch.engine` holds the engine (directions, the exact integer search, hard positives on tensors) and
`search_batch`, what `hcgen generate --framework torch` needs per batch. This package imports torch (the real
one: imports are absolute) and is never imported by `import hcgen`.
"""

from hcgen.torch.engine import PixelModel, eval_mode, search_batch
from hcgen.torch.hard_positives import HardPositives

__all__ = ["HardPositives", "PixelModel", "eval_mode", "search_batch"]

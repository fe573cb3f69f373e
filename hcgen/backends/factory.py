"""One way to build a `Backend`: a `BackendSpec` (what the command line says) opens the net and names what
generate.json records about it, from the same fields, so the provenance cannot disagree with the net used.

    spec = BackendSpec(model="models/lenet_deploy.prototxt", weights="lenet.caffemodel")
    net = spec.open()                      # a CaffeNet (pycaffe loaded here) or a TorchNet (torch loaded here)
    GenerateSettings(**spec.provenance(), source=..., ...)

`open` checks the options first (a missing --weights with Caffe, --device cuda or the torchvision preset on
hcgen's CPU Caffe) and, for Caffe, everything that would make Caffe abort the process
(`hcgen.backends.caffe_checks.check_deploy`), as `hcgen.errors.UserError`s. The net it returns carries its
spec (``net.spec``), which `hcgen.generate.run.generate` compares with the settings it records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from hcgen.backends.base import Backend, preset
from hcgen.errors import BadInput

__all__ = ["BackendSpec", "FRAMEWORKS"]

FRAMEWORKS = ("caffe", "torch")


@dataclass(frozen=True)
class BackendSpec:
    """A network as the command line names it.

    model : caffe: the deploy prototxt; torch: FILE.py:FACTORY or a TorchScript file.
    weights : the caffemodel (required with caffe); a torch state_dict (optional with torch).
    framework : caffe or torch.
    preprocess : a `hcgen.backends.base.PREPROCESSING` name.
    layer : the score layer (default: the input of the final softmax / the model's output).
    device : cpu, or cuda (torch only).
    batch_size : images per forward pass (does not change any result, so it is not provenance).
    """

    model: str | os.PathLike
    weights: Optional[str | os.PathLike] = None
    framework: str = "caffe"
    preprocess: str = "lenet"
    layer: Optional[str] = None
    device: str = "cpu"
    batch_size: int = 256

    def check(self) -> None:
        """The options alone make sense together (nothing is loaded); `BadInput` otherwise."""
        if self.framework not in FRAMEWORKS:
            raise BadInput(f"unknown framework {self.framework!r}; choose one of {', '.join(FRAMEWORKS)}")
        if self.batch_size < 1:
            raise BadInput(f"batch size must be positive, got {self.batch_size}")
        if self.framework == "caffe":
            if self.weights is None:
                raise BadInput("--weights (the trained caffemodel) is required with --framework caffe")
            if self.device != "cpu":
                raise BadInput("--device cuda needs --framework torch (hcgen's Caffe is a CPU build)")
        preset(self.preprocess, self.framework)

    def open(self) -> Backend:
        """The net, checked; it carries this spec as ``net.spec``."""
        self.check()
        if self.framework == "torch":
            from hcgen.backends.torch import open_torch_net  # torch: loaded only when used

            net = open_torch_net(str(self.model), None if self.weights is None else str(self.weights),
                                 self.preprocess, self.layer, self.device, batch_size=self.batch_size)
        else:
            from hcgen.backends.caffe import CaffeNet, preprocessing_preset  # pycaffe: loaded only when used
            from hcgen.backends.caffe_checks import check_deploy  # pycaffe: loaded only when used

            check_deploy(self.model, self.weights)  # what would make Caffe abort this process, as a UserError
            net = CaffeNet(self.model, self.weights, preprocessing=preprocessing_preset(self.preprocess),
                           layer=self.layer, batch_size=self.batch_size)
        net.spec = self
        return net

    def provenance(self) -> dict:
        """The fields generate.json records about the net (`hcgen.generate.run.GenerateSettings`'s names);
        the layer the net resolved, the files' hashes and the preprocessing's numbers are added there."""
        return {"model": str(self.model), "weights": None if self.weights is None else str(self.weights),
                "preprocess": self.preprocess, "framework": self.framework, "device": self.device}

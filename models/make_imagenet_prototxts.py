"""Write the ImageNet prototxts with this Caffe's own `caffe.NetSpec`, and check them structurally.

    python models/make_imagenet_prototxts.py            # (re)write the three prototxts below
    python models/make_imagenet_prototxts.py --check    # + layers, parameter shapes and counts
    python models/make_imagenet_prototxts.py --random-weights DIR   # + random caffemodels (no real weights)

Written files (do not edit them by hand; edit this script and rerun it):

  googlenet/deploy.prototxt     BVLC-GoogLeNet (Szegedy et al. 2015; Caffe Model Zoo bvlc_googlenet)
  googlenet/train_val.prototxt  the same net with BVLC's two auxiliary heads (loss1/*, loss2/*), for
                                fine-tuning on Datum LMDBs of 224x224 BGR crops (solver_finetune.prototxt)
  resnet152/deploy.prototxt     ResNet-152 (He et al. 2016; KaimingHe/deep-residual-networks)

Layer names, and the parameter blobs they hold, follow the public prototxts so that the published
caffemodels load by name (see models/googlenet/README.md, models/resnet152/README.md for what was
checked). Deploy nets take one ``data`` Input (1x3x224x224; hcgen reshapes it), set
``force_backward: true`` and end in the Softmax ``prob`` whose input (loss3/classifier, fc1000) is the
penultimate layer of the paper. Pooling uses this Caffe's default ``ceil_mode: true``, the rounding of the
Caffe these models were trained with (BVLC's round_mode CEIL): 112 -> 56 after a 3x3/2 pooling.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
import numpy as np  # noqa: E402
from caffe import layers as L  # noqa: E402
from caffe import params as P  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402

HERE = Path(__file__).resolve().parent
GOOGLENET_DEPLOY = HERE / "googlenet" / "deploy.prototxt"
GOOGLENET_TRAIN_VAL = HERE / "googlenet" / "train_val.prototxt"
RESNET152_DEPLOY = HERE / "resnet152" / "deploy.prototxt"

# -- GoogLeNet ---------------------------------------------------------------------------------------

# Szegedy et al. 2015, Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
_LEARN = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]  # BVLC: weights, biases


def _conv_relu(n: caffe.NetSpec, name: str, relu: str, bottom, num_output: int, kernel: int,
               stride: int = 1, pad: int = 0, bias: float = 0.2):
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                            param=_LEARN, weight_filler=dict(type="xavier"),
                            bias_filler=dict(type="constant", value=bias))
    n[relu] = L.ReLU(n[name], in_place=True)
    return n[name]


def _inception(n: caffe.NetSpec, stage: str, bottom):
    c1, c3r, c3, c5r, c5, pp = INCEPTION[stage]
    p = f"inception_{stage}/"
    b1 = _conv_relu(n, p + "1x1", p + "relu_1x1", bottom, c1, 1)
    r3 = _conv_relu(n, p + "3x3_reduce", p + "relu_3x3_reduce", bottom, c3r, 1)
    b3 = _conv_relu(n, p + "3x3", p + "relu_3x3", r3, c3, 3, pad=1)
    r5 = _conv_relu(n, p + "5x5_reduce", p + "relu_5x5_reduce", bottom, c5r, 1)
    b5 = _conv_relu(n, p + "5x5", p + "relu_5x5", r5, c5, 5, pad=2)
    n[p + "pool"] = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=3, stride=1, pad=1)
    bp = _conv_relu(n, p + "pool_proj", p + "relu_pool_proj", n[p + "pool"], pp, 1)
    n[p + "output"] = L.Concat(b1, b3, b5, bp)
    return n[p + "output"]


def _aux_head(n: caffe.NetSpec, k: int, bottom, label) -> None:
    """BVLC's auxiliary classifier lossK/* (training only; loss weight 0.3)."""
    p = f"loss{k}/"
    n[p + "ave_pool"] = L.Pooling(bottom, pool=P.Pooling.AVE, kernel_size=5, stride=3)
    _conv_relu(n, p + "conv", p + "relu_conv", n[p + "ave_pool"], 128, 1)
    n[p + "fc"] = L.InnerProduct(n[p + "conv"], num_output=1024, param=_LEARN,
                                 weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0.2))
    n[p + "relu_fc"] = L.ReLU(n[p + "fc"], in_place=True)
    n[p + "drop_fc"] = L.Dropout(n[p + "fc"], dropout_ratio=0.7, in_place=True)
    n[p + "classifier"] = L.InnerProduct(n[p + "fc"], num_output=1000, param=_LEARN,
                                         weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    _loss_and_accuracy(n, k, n[p + "classifier"], label, 0.3)


def _loss_and_accuracy(n: caffe.NetSpec, k: int, scores, label, weight: float) -> None:
    p = f"loss{k}/"
    n[p + f"loss{k}"] = L.SoftmaxWithLoss(scores, label, loss_weight=weight)
    test = dict(phase=caffe.TEST)
    n[p + "top-1"] = L.Accuracy(scores, label, include=test)
    n[p + "top-5"] = L.Accuracy(scores, label, include=test, accuracy_param=dict(top_k=5))


def googlenet(train_val: bool = False, train_batch: int = 80, test_batch: int = 50) -> caffe_pb2.NetParameter:
    """BVLC-GoogLeNet: the deploy net, or its train_val with Data layers and the auxiliary heads."""
    n = caffe.NetSpec()
    if train_val:
        n["data"], n["label"] = L.Data(
            ntop=2, include=dict(phase=caffe.TRAIN), data_param=dict(source="train_lmdb", backend=P.Data.LMDB,
                                                                      batch_size=train_batch),
            transform_param=dict(mirror=True, crop_size=224, mean_value=[104, 117, 123]))
    else:
        n["data"] = L.Input(input_param=dict(shape=dict(dim=[1, 3, 224, 224])))
    x = _conv_relu(n, "conv1/7x7_s2", "conv1/relu_7x7", n["data"], 64, 7, stride=2, pad=3)
    n["pool1/3x3_s2"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n["pool1/norm1"] = L.LRN(n["pool1/3x3_s2"], local_size=5, alpha=0.0001, beta=0.75)
    x = _conv_relu(n, "conv2/3x3_reduce", "conv2/relu_3x3_reduce", n["pool1/norm1"], 64, 1)
    x = _conv_relu(n, "conv2/3x3", "conv2/relu_3x3", x, 192, 3, pad=1)
    n["conv2/norm2"] = L.LRN(x, local_size=5, alpha=0.0001, beta=0.75)
    n["pool2/3x3_s2"] = L.Pooling(n["conv2/norm2"], pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _inception(n, "3b", _inception(n, "3a", n["pool2/3x3_s2"]))
    n["pool3/3x3_s2"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _inception(n, "4a", n["pool3/3x3_s2"])
    if train_val:
        _aux_head(n, 1, x, n["label"])
    x = _inception(n, "4d", _inception(n, "4c", _inception(n, "4b", x)))
    if train_val:
        _aux_head(n, 2, x, n["label"])
    x = _inception(n, "4e", x)
    n["pool4/3x3_s2"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _inception(n, "5b", _inception(n, "5a", n["pool4/3x3_s2"]))
    n["pool5/7x7_s1"] = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n["pool5/drop_7x7_s1"] = L.Dropout(n["pool5/7x7_s1"], dropout_ratio=0.4, in_place=True)
    n["loss3/classifier"] = L.InnerProduct(n["pool5/7x7_s1"], num_output=1000, param=_LEARN,
                                           weight_filler=dict(type="xavier"),
                                           bias_filler=dict(type="constant", value=0))
    if train_val:
        _loss_and_accuracy(n, 3, n["loss3/classifier"], n["label"], 1.0)
    else:
        n["prob"] = L.Softmax(n["loss3/classifier"])
    net = n.to_proto()
    net.name = "GoogleNet"
    if train_val:  # NetSpec holds one layer per top name: the TEST-phase Data layer is added here
        test = caffe_pb2.LayerParameter()
        test.CopyFrom(net.layer[0])
        test.include[0].phase = caffe_pb2.TEST
        test.data_param.source = "val_lmdb"
        test.data_param.batch_size = test_batch
        test.transform_param.mirror = False
        net.layer.insert(1, test)
    else:
        net.force_backward = True
    return net


# -- ResNet-152 --------------------------------------------------------------------------------------

RESNET152_BLOCKS = (3, 8, 36, 3)  # bottleneck blocks in stages res2..res5 (He et al. 2016, Table 1)


def _block_names(stage: int, count: int) -> list[str]:
    """MSRA naming: res2a, res2b, res2c; from 4 blocks on res3a, res3b1, res3b2, ..."""
    if count <= 3:
        return [f"{stage}{'abc'[i]}" for i in range(count)]
    return [f"{stage}a"] + [f"{stage}b{i}" for i in range(1, count)]


def _conv_bn(n: caffe.NetSpec, branch: str, bottom, num_output: int, kernel: int, stride: int,
             relu: bool) -> None:
    """res{b}_{branch} convolution (no bias) + bn{b}_{branch} + scale{b}_{branch} [+ relu], b = block."""
    block, part = branch.split("_", 1)
    conv = f"res{branch}"
    n[conv] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride,
                            pad=(kernel - 1) // 2, bias_term=False, weight_filler=dict(type="msra"))
    n[f"bn{block}_{part}"] = L.BatchNorm(n[conv], batch_norm_param=dict(use_global_stats=True), in_place=True)
    n[f"scale{block}_{part}"] = L.Scale(n[conv], scale_param=dict(bias_term=True), in_place=True)
    if relu:
        n[f"{conv}_relu"] = L.ReLU(n[conv], in_place=True)


def resnet152() -> caffe_pb2.NetParameter:
    """ResNet-152 deploy net with the names of KaimingHe/deep-residual-networks' ResNet-152-deploy.prototxt."""
    n = caffe.NetSpec()
    n["data"] = L.Input(input_param=dict(shape=dict(dim=[1, 3, 224, 224])))
    n["conv1"] = L.Convolution(n["data"], num_output=64, kernel_size=7, stride=2, pad=3, bias_term=False,
                               weight_filler=dict(type="msra"))
    n["bn_conv1"] = L.BatchNorm(n["conv1"], batch_norm_param=dict(use_global_stats=True), in_place=True)
    n["scale_conv1"] = L.Scale(n["conv1"], scale_param=dict(bias_term=True), in_place=True)
    n["conv1_relu"] = L.ReLU(n["conv1"], in_place=True)
    n["pool1"] = L.Pooling(n["conv1"], pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n["pool1"]
    for stage, count in zip((2, 3, 4, 5), RESNET152_BLOCKS):
        width = 64 * 2 ** (stage - 2)
        for i, block in enumerate(_block_names(stage, count)):
            stride = 2 if i == 0 and stage > 2 else 1  # MSRA: the stride sits in branch1 and branch2a
            if i == 0:
                _conv_bn(n, f"{block}_branch1", x, 4 * width, 1, stride, relu=False)
                shortcut = n[f"res{block}_branch1"]
            else:
                shortcut = x
            _conv_bn(n, f"{block}_branch2a", x, width, 1, stride, relu=True)
            _conv_bn(n, f"{block}_branch2b", n[f"res{block}_branch2a"], width, 3, 1, relu=True)
            _conv_bn(n, f"{block}_branch2c", n[f"res{block}_branch2b"], 4 * width, 1, 1, relu=False)
            n[f"res{block}"] = L.Eltwise(shortcut, n[f"res{block}_branch2c"])
            n[f"res{block}_relu"] = L.ReLU(n[f"res{block}"], in_place=True)
            x = n[f"res{block}"]
    n["pool5"] = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n["fc1000"] = L.InnerProduct(n["pool5"], num_output=1000, weight_filler=dict(type="gaussian", std=0.01),
                                 bias_filler=dict(type="constant", value=0))
    n["prob"] = L.Softmax(n["fc1000"])
    net = n.to_proto()
    net.name = "ResNet-152"
    net.force_backward = True
    return net


# -- writing, checking, random weights ---------------------------------------------------------------

HEADER = ("# Generated by models/make_imagenet_prototxts.py with this Caffe's caffe.NetSpec; "
          "edit the script, not this file.\n")


def write_all() -> list[Path]:
    written = []
    for path, net in ((GOOGLENET_DEPLOY, googlenet()), (GOOGLENET_TRAIN_VAL, googlenet(train_val=True)),
                      (RESNET152_DEPLOY, resnet152())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + str(net))
        written.append(path)
    return written


def parameter_shapes(net: caffe.Net) -> dict[str, list[tuple[int, ...]]]:
    """{layer name: [blob shapes]} of every layer holding parameters, in net order."""
    return {name: [tuple(b.data.shape) for b in blobs] for name, blobs in net.params.items()}


def learnable_count(net: caffe.Net) -> int:
    """Parameters a solver updates: every blob except BatchNorm's mean / variance / scale-factor statistics."""
    types = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    return sum(b.data.size for name, blobs in net.params.items() if types[name] != "BatchNorm" for b in blobs)


def random_weights(deploy: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """Save a caffemodel with the prototxt's fillers (seeded); BatchNorm statistics calibrated on noise.

    Caffe fills BatchNorm blobs with zeros, which with ``use_global_stats`` divides by sqrt(eps) and
    makes a random ResNet overflow. Each BatchNorm instead gets the per-channel mean and variance of its
    input on one seeded batch of two noise images (std 60 around 0, i.e. pixels minus the mean), set
    layer by layer in one forward pass, as a trained net's statistics would be.
    """
    caffe.set_random_seed(seed)
    net = caffe.Net(str(deploy), caffe.TEST)
    data = net.inputs[0]
    net.blobs[data].reshape(2, *net.blobs[data].data.shape[1:])
    net.reshape()
    net.blobs[data].data[...] = np.random.default_rng(seed).normal(0, 60, net.blobs[data].data.shape)
    start = 0
    for i, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        if layer.type != "BatchNorm":
            continue
        if i > start:
            net._forward(start, i - 1)
        x = net.blobs[net.bottom_names[name][0]].data
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        net.params[name][0].data[...] = x.mean(axis=axes)
        net.params[name][1].data[...] = x.var(axis=axes)
        net.params[name][2].data[...] = 1
        start = i
    net.save(str(out))
    return Path(out)


def check(deploy: Path) -> str:
    """Layer count, parameter layers, shapes and totals, output shape of a deploy net."""
    net = caffe.Net(str(deploy), caffe.TEST)
    shapes = parameter_shapes(net)
    total = sum(int(np.prod(s)) for blobs in shapes.values() for s in blobs)
    lines = [f"{deploy.relative_to(HERE)}: {len(net.layers)} layers, {len(shapes)} with parameters, "
             f"{total:,} parameter values ({learnable_count(net):,} learnable), "
             f"output {net.outputs[-1]} {tuple(net.blobs[net.outputs[-1]].data.shape)}"]
    for name in list(shapes)[:3] + ["..."] + list(shapes)[-2:]:
        lines.append(f"  {name}: {shapes[name]}" if name != "..." else "  ...")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="print layer / parameter summaries")
    parser.add_argument("--random-weights", metavar="DIR", help="also save googlenet_random.caffemodel and "
                        "resnet152_random.caffemodel (seeded fillers) into DIR")
    args = parser.parse_args(argv)
    for path in write_all():
        print(f"wrote {path}")
    if args.check:
        for deploy in (GOOGLENET_DEPLOY, RESNET152_DEPLOY):
            print(check(deploy))
    if args.random_weights:
        out = Path(args.random_weights)
        out.mkdir(parents=True, exist_ok=True)
        for name, deploy in (("googlenet", GOOGLENET_DEPLOY), ("resnet152", RESNET152_DEPLOY)):
            print(f"wrote {random_weights(deploy, out / f'{name}_random.caffemodel')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

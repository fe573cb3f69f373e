"""The one module that imports pycaffe; every other module takes `caffe` and its protobuf classes from here.

Importing it sets two environment variables first, because they only act before Caffe's native library
loads: ``GLOG_minloglevel=2`` keeps Caffe's INFO logging off stderr, and ``OPENBLAS_NUM_THREADS=1``
gives Caffe one BLAS thread (numpy's own OpenBLAS is loaded before this and unaffected; spinning BLAS
threads collapse under load, one worker per core is the right shape, see benchmarks/README.md). Set
either yourself to override. `hcgen.backends.blas.configure_openblas` picks OpenBLAS's kernels likewise
before the library loads. Caffe runs on the CPU (hcgen builds a CPU-only Caffe).
"""
from __future__ import annotations

import os

from hcgen.backends.blas import configure_openblas

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
configure_openblas()  # a CPU newer than Debian's OpenBLAS gets its generic SSE3 kernels: pick the CPU's family

import caffe  # noqa: E402  (after the environment above)
from caffe.proto import caffe_pb2  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

caffe.set_mode_cpu()

__all__ = ["caffe", "caffe_pb2", "text_format", "DecodeError"]

"""scripts/finetune_torch.py --online: repeatable with a seed, and a killed run resumes from its checkpoint to
the very weights of an uninterrupted run (SIGKILL at a crash point after step 3; checkpoints every 2 steps)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "finetune_torch.py"
ARGS = ["--train-digits", "320", "--base-iterations", "20", "--finetune-iterations", "6", "--online",
        "--online-methods", "hc-d:1-2", "--batch-size", "16", "--hp-per-step", "8", "--checkpoint-every", "2",
        "--eval-digits", "100", "--test-sources", "0", "--seed", "3"]


def _run(out, *extra, crash=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HCGEN_CRASH_AT", None)
    if crash:
        env["HCGEN_CRASH_AT"] = crash
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra], capture_output=True,
                          text=True, env=env, timeout=900)


def _weights(path):
    return torch.load(path, weights_only=True)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "a"
    r = _run(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "online hc-d:1-2 x1.05" in r.stdout and "6 steps" in r.stdout
    return out


def test_same_seed_same_weights(straight, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    r = _run(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same(_weights(out / "base.pt"), _weights(straight / "base.pt"))
    assert _same(_weights(out / "online.pt"), _weights(straight / "online.pt"))
    assert not _same(_weights(out / "online.pt"), _weights(out / "base.pt"))


def test_killed_run_resumes_to_the_same_weights(straight, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    shutil.copy(straight / "base.pt", out / "base.pt")  # the base net is not what this test is about
    r = _run(out, crash="online-step:3")
    assert r.returncode == -9, r.stderr[-2000:]
    assert _weights(out / "online.ckpt")["iteration"] == 2 and not (out / "online.pt").exists()
    r = _run(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the online fine-tune at step 2 of 6" in r.stdout
    assert _same(_weights(out / "online.pt"), _weights(straight / "online.pt"))
    r = _run(out, "--hp-per-step", "4")
    assert r.returncode != 0 and "is an online run with other settings (hp_per_step)" in r.stderr

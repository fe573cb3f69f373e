"""How long the Table 1 protocol takes: the work of each stage (training iterations, searches, records ...),
the default seconds per unit of it, and the estimates `hcgen table1 --estimate` prints, calibrated by the
stages finished in the work folder, or else by other profiles' runs beside it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from hcgen.core.methods import parse_methods
from hcgen.errors import BadInput
from hcgen.experiments.table1.protocol import (HELDOUT_METHODS, HELDOUT_TYPES, MNIST_TEST, MNIST_TRAIN, PROFILES,
                                               Profile)
from hcgen.stages import graph as _stages
from hcgen.stages.graph import Stage


# Seconds per unit of each kind of stage on one of two workers side by side (`hcgen table1 --dask`),
# measured on the machine named in benchmarks/README.md; `--estimate` uses them until stages have
# finished in the work folder, whose own rates then replace them.
SECONDS_PER_UNIT = {
    "mnist conversion": 0.8, "InfiMNIST-style images": 6.2e-5, "training iterations": 0.0503,
    "searches": 0.0056, "searches (test digits)": 0.0075, "held-out records": 9e-5,
    "mixed records": 2.54e-5, "evaluated images": 3.05e-4, "tau calibration": 2.0,
    "merged records": 2.54e-5,  # not measured yet: taken as fast as mixing (both copy Datums)
}


def stage_work(name: str, params: dict, p: Profile) -> tuple[str, float]:
    """(kind, size) of a stage of profile `p`, from its name and parameters: training iterations,
    searches (source digits x directions), records mixed or assembled, images evaluated or deformed.
    Generated counts assume every search succeeds (99.9% did on LeNet)."""

    if name == "mnist":
        return "mnist conversion", 1
    if name == "infimnist":
        return "InfiMNIST-style images", params["count"]
    if name == "tau":
        return "tau calibration", 1
    if name.startswith("order"):
        return "mixed records", MNIST_TRAIN
    if name.startswith(("base", "ft-", "scratch-")):
        return "training iterations", params["iterations"]
    if name.startswith("gen-") and "split" not in params:  # the merge of a sharded generation
        split = "train" if name.startswith("gen-train") else "test"
        sources = (p.train_images or MNIST_TRAIN) if split == "train" else (p.test_images or MNIST_TEST)
        methods = p.train_methods if split == "train" else HELDOUT_METHODS
        return "merged records", sources * len(parse_methods(methods))
    if name.startswith("gen-"):
        sources = params["limit"] or (MNIST_TRAIN if params["split"] == "train" else MNIST_TEST)
        shards = int(params.get("shard", "0/1").split("/")[1])
        # from the test digits: two hard-positive scales, so more PASS work per search
        kind = "searches" if params["split"] == "train" else "searches (test digits)"
        return kind, sources * len(parse_methods(params["methods"])) / shards
    if name == "heldout":
        return "held-out records", len(HELDOUT_TYPES) * params["per_type"]
    if name.startswith("mix-"):
        mnist = MNIST_TRAIN if params.get("with_mnist", True) else 0
        if params["methods"] is None:  # the InfiMNIST-style row
            return "mixed records", MNIST_TRAIN + p.infimnist_count
        generated = (p.train_images or MNIST_TRAIN) * len(params["methods"])
        if params["min_pass"] is not None:  # a PASS bin: HC-D at both scales, split over the bins
            generated = generated * 2 / len(p.pass_bins)
        return "mixed records", mnist + generated
    if name.startswith("eval-"):
        return "evaluated images", MNIST_TEST + len(HELDOUT_TYPES) * p.heldout_per_type
    raise BadInput(f"unknown stage {name}")


def work_of(profile: Profile):
    return lambda name, params: stage_work(name, params, profile)


def expected_seconds(graph: dict[str, Stage], profile: Profile, rates: Optional[dict[str, float]] = None,
                     work: Optional[Path] = None) -> dict[str, float]:
    """Stage -> expected seconds on one worker (`rates` over SECONDS_PER_UNIT); 0 if finished in `work`."""
    return _stages.expected_seconds(graph, work_of(profile), {**SECONDS_PER_UNIT, **(rates or {})}, work)


def measured_rates(work: Path, profile: Profile) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds per unit, total seconds, stages) over the finished stages of a `profile` run."""
    return _stages.measured_rates(work, work_of(profile))


def estimate(graph: dict[str, Stage], profile: Profile, work: Path, workers: int) -> tuple[float, float, bool]:
    """(stage seconds left, wall seconds with `workers`, calibrated from `work`) for `graph`."""
    return _stages.estimate(graph, work_of(profile), SECONDS_PER_UNIT, work, workers)


def sibling_rates(work: Path) -> tuple[dict[str, float], list[str]]:
    """Rates measured by runs of *other* profiles beside `work` (work/table1/quick, .../medium, ...):
    kind -> seconds per unit over all their finished stages, and the profiles they came from."""
    seconds: dict[str, float] = {}
    units: dict[str, float] = {}
    used = []
    root = Path(work).parent
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder == Path(work) or folder.name not in PROFILES or not folder.is_dir():
            continue
        rates = measured_rates(folder, PROFILES[folder.name])
        if rates:
            used.append(folder.name)
        for kind, (rate, total, _) in rates.items():
            seconds[kind] = seconds.get(kind, 0.0) + total
            units[kind] = units.get(kind, 0.0) + total / rate
    return {k: seconds[k] / units[k] for k in seconds if units[k] > 0}, used


def estimate_for_cli(graph: dict[str, Stage], profile: Profile, work: Path, workers: int) -> tuple[float, float, str]:
    """(stage seconds left, wall seconds, where the rates came from): this work folder's finished stages,
    else those of other profiles' runs beside it, else the defaults."""
    left, wall, calibrated = estimate(graph, profile, work, workers)
    if calibrated:
        return left, wall, "rates from this work folder's finished stages"
    rates, used = sibling_rates(work)
    if rates:  # nothing finished in `work`, so these rates stand in for the defaults
        left, wall, _ = _stages.estimate(graph, work_of(profile), {**SECONDS_PER_UNIT, **rates}, work, workers)
        return left, wall, f"rates from the finished {' and '.join(used)} run(s) in {Path(work).parent}"
    return left, wall, ("default rates, from a 2-core machine (benchmarks/README.md); they adapt once stages "
                        "finish here")

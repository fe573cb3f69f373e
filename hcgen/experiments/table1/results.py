"""Table 1 and Figures 2, 4, 5, 6 from the outputs of the Table 1 stages (see `hcgen.experiments.table1.protocol`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from hcgen.data.lmdb_io import decode_datum, lmdb_count, read_lmdb, read_raw
from hcgen.data.metadata import MetadataTable
from hcgen.experiments.table1.claims import claims, claims_markdown
from hcgen.util.fileio import atomic_write


@dataclass(frozen=True)
class ReportSpec:
    """What the table, the claims and the figures need to know of a Table 1 protocol; built by
    `hcgen.experiments.table1.protocol.report_spec` from a profile, read here and nowhere else.

    rows        Table 1 row -> the eval stages of its nets, in net order.
    units       row -> one (base net, ordering) per eval stage (ordering None for a base net itself):
                what pairs two rows' nets for the paired tests.
    row_stages  row -> the mix stages whose records each net of the row was fine-tuned on.
    bins        Fig. 6: (PASS range label, its eval stages) per bin.
    tau_stage   the stage whose tau.json calibrated the PASS threshold, if any.
    paper, paper_train_images   the paper's numbers per row.
    claims      whether the claims are checked (they need more than one net per row).
    example_generation, training_generation, mnist_stage   the stages Fig. 2 (a test-digit generation on
                base net 1), Figs. 4-5 (base net 1's training-digit generation) and Fig. 2's originals read.
    image_shape (H, W) of one grey image, as the generations store them.
    """

    profile: str
    rows: dict[str, list[str]]
    description: str
    heldout_types: int
    units: dict[str, list[tuple[int, Optional[int]]]] = field(default_factory=dict)
    row_stages: dict[str, list[str]] = field(default_factory=dict)
    bins: list[tuple[str, list[str]]] = field(default_factory=list)
    tau_stage: Optional[str] = None
    paper: dict[str, tuple] = field(default_factory=dict)
    paper_train_images: dict[str, str] = field(default_factory=dict)
    caveat: Optional[str] = None
    claims: bool = True
    example_generation: str = "gen-test1"
    training_generation: str = "gen-train1"
    mnist_stage: str = "mnist"
    image_shape: tuple[int, int] = (28, 28)

MNIST_SET, HELDOUT_SET = "mnist_test_lmdb", "lmdb"


def _errors(folder: Path) -> tuple[float, float]:
    """(MNIST test error, held-out adversarial error) in % from an eval stage's errors.json."""
    rows = json.loads((folder / "errors.json").read_text())
    by = {(Path(r["dataset"]).name, r["group"]): r for r in rows}
    return (100 * by[(MNIST_SET, "all")]["error_rate"], 100 * by[(HELDOUT_SET, "all")]["error_rate"])


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.3f}% ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _training_images(mix: Path) -> int:
    """Generated (or deformed) images a net trained on: its mixed LMDB minus the MNIST digits in it."""
    settings = json.loads((mix / "lmdb" / "mix.json").read_text())
    mnist = lmdb_count(settings["with_mnist"]) if settings.get("with_mnist") else 0
    return lmdb_count(mix / "lmdb") - mnist


def table1(spec: ReportSpec, outputs: dict[str, Path]) -> tuple[str, dict]:
    """Markdown Table 1 (ours beside the paper's), the claims of Sec. 5.2, and the numbers behind them.
    `spec` is the protocol's description (`hcgen.experiments.table1.protocol.report_spec`)."""
    numbers: dict[str, dict] = {}
    for row, evals in spec.rows.items():
        errs = np.array([_errors(outputs[e]) for e in evals])
        numbers[row] = {"nets": len(evals), "mnist": errs[:, 0].tolist(), "adversarial": errs[:, 1].tolist()}
        if spec.units.get(row):
            numbers[row]["units"] = [list(u) for u in spec.units[row]]
        mixes = spec.row_stages.get(row, [])
        if mixes:
            numbers[row]["training_images"] = [_training_images(outputs[m]) for m in mixes]
    bins = {label: {"nets": len(evals), "mnist": [_errors(outputs[e])[0] for e in evals],
                    "adversarial": [_errors(outputs[e])[1] for e in evals],
                    "units": [[b, None] for b in range(1, len(evals) + 1)]} for label, evals in spec.bins}
    tau = None
    if spec.tau_stage and spec.tau_stage in outputs:
        tau = json.loads((outputs[spec.tau_stage] / "tau.json").read_text())
    paper, paper_images = spec.paper, spec.paper_train_images
    order = sorted(numbers, key=lambda r: np.mean(numbers[r]["mnist"]))
    lines = [f"# Table 1 — error rates ({spec.profile} profile)", "", spec.description]
    if spec.caveat:
        lines += ["", spec.caveat]
    lines += [
        "",
        "| Method | MNIST (ours) | Adversarial (ours) | nets | training images per net (ours) "
        "| MNIST (paper) | Adversarial (paper) | training images (paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in order:
        n = numbers[row]
        p = paper.get(row, ("", ""))
        images = (f"{np.mean(n['training_images']):,.0f}" if n.get("training_images") else "—")
        lines.append(f"| {row} | {_mean_std(n['mnist'])} | {_mean_std(n['adversarial'])} | {n['nets']} | {images} | "
                     f"{p[0]} | {p[1]} | {f'{paper_images[row]:,}' if row in paper_images else ''} |")
    lines += ["", "Mean ± sample std over the nets of each row; adversarial = error on the held-out set "
              f"({spec.heldout_types} types from the MNIST test digits, drawn evenly from every base net, "
              "never trained on). Paper: Rozsa et al. 2016, Table 1 (9 nets per row; Goodfellow et al.'s "
              ".782% / 17.9% row is not reproduced). InfiMNIST-style: our random affine + elastic deformations, "
              "not InfiMNIST's data. Training images of the paper: Sec. 5.2 (FGV 37,663; HC-D-9 and "
              "HC-D-9-1.05 \"approximately 340K\"; InfiMNIST 1M)."]
    if tau is not None:
        value = "none (every successful search)" if tau["tau"] is None else f"{tau['tau']:.4f}"
        lines += ["", f"## PASS threshold of the training rows: tau = {value} ({tau['mode']})", "",
                  "| Row | kept per net | found per net | kept per 60K digits (ours, scaled) | paper |",
                  "|---|---|---|---|---|"]
        for row, t in tau["rows"].items():
            kept, found = ", ".join(map(str, t["kept_per_net"])), ", ".join(map(str, t["found_per_net"]))
            theirs = f"{t['paper']:,}" if t.get("paper") else ""
            lines.append(f"| {row} | {kept} | {found} | {t['kept_per_60k_digits']:,.0f} | {theirs} |")
    if bins:
        lines += ["", "## Fig. 6: fine-tuned on HC-D images by PASS range", "",
                  "| PASS range | nets | MNIST | Adversarial |", "|---|---|---|---|"]
        for label, b in bins.items():
            lines.append(f"| {label} | {b['nets']} | {_mean_std(b['mnist'])} | {_mean_std(b['adversarial'])} |")
    checked = claims(numbers, bins) if spec.claims else []
    if checked:
        lines += ["", "## Does it reproduce? The claims of Sec. 5.2", ""] + claims_markdown(checked)
    return "\n".join(lines) + "\n", {"rows": numbers, "bins": bins, "tau": tau, "claims": checked}


def _records(gen: Path) -> list[dict]:
    return list(MetadataTable(gen / "lmdb" / "metadata.csv").rows())


def _type(r: dict) -> str:
    scale = float(r["scale"])
    return r["method"] if scale == 1.0 else f"{r['method']} x{scale:g}"


def figures(outputs: dict[str, Path], spec: ReportSpec, results: Path) -> list[str]:
    import matplotlib  # matplotlib: loaded only when used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: loaded only when used

    note = f" ({spec.profile} profile)"
    made = []
    gen = outputs[spec.example_generation]
    recs = _records(gen)
    # Fig. 2: one digit, its FGS / FGV / HC-D-1 / HC-D-2 adversarials and their perturbations.
    wanted = ["FGS", "FGV", "HC-D-1", "HC-D-2"]
    by_src: dict[str, dict] = {}
    for i, r in enumerate(recs):
        if float(r["scale"]) == 1.0 and r["method"] in wanted:
            by_src.setdefault(r["source_index"], {})[r["method"]] = (i, r)
    src = next((s for s, d in by_src.items() if len(d) == len(wanted)), None)
    if src is not None:
        _, mnist_images, _ = read_lmdb(outputs[spec.mnist_stage] / "mnist_test_lmdb")
        x = mnist_images[int(src), 0].astype(float)
        fig, ax = plt.subplots(2, 5, figsize=(11, 5))
        ax[0, 0].imshow(x, cmap="gray", vmin=0, vmax=255)
        ax[0, 0].set_title(f"original ({recs[by_src[src]['FGS'][0]]['label']})")
        ax[1, 0].axis("off")
        for j, m in enumerate(wanted, start=1):
            i, r = by_src[src][m]
            adv = decode_datum(read_raw(gen / "lmdb", [i])[0])
            a = np.frombuffer(adv.data, np.uint8).reshape(spec.image_shape).astype(float)
            d = a - x
            ax[0, j].imshow(a, cmap="gray", vmin=0, vmax=255)
            ax[0, j].set_title(f"{m} -> {r['pred']}")
            ax[1, j].imshow(d / max(np.abs(d).max(), 1), cmap="gray", vmin=-1, vmax=1)
            ax[1, j].set_xlabel(f"({float(r['pass']):.3f}, {float(r['l2_per_pixel']):.3f}, {float(r['linf']):.0f})")
        for a in ax.flat:
            a.set_xticks([]), a.set_yticks([])
        fig.suptitle("Fig. 2: adversarials and perturbations (PASS, L2 per pixel, L∞)" + note)
        fig.savefig(results / "fig2_adversarials.png", dpi=100)
        plt.close(fig)
        made.append("fig2_adversarials.png")

    # Fig. 4: PASS distributions per type (training generation of base net 1).
    train_recs = _records(outputs[spec.training_generation])
    types: dict[str, list[float]] = {}
    for r in train_recs:
        types.setdefault(_type(r), []).append(float(r["pass"]))
    names = sorted(types, key=lambda t: (t.split(" ")[0][:4], len(t), t))
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.boxplot([types[t] for t in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=90)
    ax.set_ylabel("PASS")
    ax.set_title("Fig. 4: PASS of adversarial and hard positive LeNet/MNIST images" + note)
    fig.tight_layout()
    fig.savefig(results / "fig4_pass_distributions.png", dpi=100)
    plt.close(fig)
    made.append("fig4_pass_distributions.png")

    # Fig. 5: mean PASS, L2, L∞ per adversarial type (L2 and L∞ scaled so that the max is 1).
    adv = [t for t in names if " x" not in t]
    stats = {m: np.array([[float(r["pass"]), float(r["l2"]), float(r["linf"])] for r in train_recs
                          if _type(r) == m]).mean(axis=0) for m in adv}
    arr = np.array([stats[m] for m in adv])
    arr[:, 1:] /= arr[:, 1:].max(axis=0)
    fig, ax = plt.subplots(figsize=(12, 4))
    w = 0.27
    for j, label in enumerate(["PASS", "L2 (scaled)", "L∞ (scaled)"]):
        ax.bar(np.arange(len(adv)) + (j - 1) * w, arr[:, j], w, label=label)
    ax.set_xticks(range(len(adv)), adv, rotation=90)
    ax.legend()
    ax.set_title("Fig. 5: PASS vs L2 vs L∞ (means per type)" + note)
    fig.tight_layout()
    fig.savefig(results / "fig5_metrics.png", dpi=100)
    plt.close(fig)
    made.append("fig5_metrics.png")

    # Fig. 6: error of nets fine-tuned on HC-D hard positives binned by PASS (mean ± std over the bin's nets).
    labels = [label for label, _ in spec.bins]
    if labels:
        per_bin = [np.array([_errors(outputs[e]) for e in evals]) for _, evals in spec.bins]
        mean = np.array([e.mean(axis=0) for e in per_bin])
        std = np.array([e.std(axis=0, ddof=1) if len(e) > 1 else np.zeros(2) for e in per_bin])
        fig, ax1 = plt.subplots(figsize=(7, 4.6))
        x = np.arange(len(labels))
        ax1.errorbar(x, mean[:, 0], yerr=std[:, 0], fmt="o-", capsize=3, label="MNIST test error (%)")
        ax2 = ax1.twinx()
        ax2.errorbar(x + 0.05, mean[:, 1], yerr=std[:, 1], fmt="s--", color="C1", capsize=3,
                     label="adversarial test error (%)")
        ax1.set_xticks(x, labels)
        ax1.set_xlabel("PASS range of the HC-D training images")
        ax1.set_ylabel("MNIST error (%)")
        ax2.set_ylabel("adversarial error (%)")
        nets = len(spec.bins[0][1])
        # title on top, legend below the axes: neither hides the other
        fig.suptitle(f"Fig. 6: training on hard positives by PASS range{note}, {nets} net(s) per bin", fontsize=10)
        fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        fig.savefig(results / "fig6_pass_bins.png", dpi=100)
        plt.close(fig)
        made.append("fig6_pass_bins.png")
    return made


def write_report(spec: ReportSpec, outputs: dict[str, Path], results: Path,
                 stage_seconds: dict[str, float] | None = None) -> dict:
    """table1.md, table1.json, the figures, stage_times.json (if given) and a README into `results`."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    text, numbers = table1(spec, outputs)
    atomic_write(results / "table1.md", text)
    atomic_write(results / "table1.json", json.dumps({"profile": spec.profile, **numbers}, indent=1))
    if stage_seconds is not None:
        atomic_write(results / "stage_times.json", json.dumps(stage_seconds, indent=1, sort_keys=True))
    made = figures(outputs, spec, results)
    reproduce = ""
    if numbers["claims"]:
        reproduce = "\n## Does it reproduce?\n\n" + "\n".join(claims_markdown(numbers["claims"])) + "\n"
    tau = numbers["tau"]
    if tau and tau.get("tau") is not None and tau["rows"].get("HC-D-9"):
        rows = tau["rows"]
        reproduce += (f"\nPASS threshold: tau = {tau['tau']:.4f} keeps {rows['FGV']['kept_share_of_digits']:.1%} of the "
                      f"digits as FGV images (the paper's 37,663 / 60K = {tau['paper_fgv_share']:.1%}) and "
                      f"{rows['HC-D-9']['kept_per_60k_digits']:,.0f} HC-D-9 images per 60K digits (paper: ~340K).\n")
    figure_lines = {
        "fig2_adversarials.png": "one test digit and its minimal FGS, FGV, HC-D-1, HC-D-2 adversarials on base net 1, "
        "perturbations scaled to [-1, 1] (black -1, white +1), captions (PASS, L2 per pixel = ||δ||₂ / 784, L∞)",
        "fig4_pass_distributions.png": "PASS per type over base net 1's training-image generation (boxes: "
        "quartiles, whiskers 1.5 IQR)",
        "fig5_metrics.png": "per adversarial type, mean PASS and mean L2 / L∞ each scaled so the largest type is 1",
        "fig6_pass_bins.png": "base nets fine-tuned on their HC-D-1..9 images (all scales) whose PASS falls in each "
        "range, plus the 60K digits; MNIST and held-out adversarial error, mean ± std",
    }
    atomic_write(results / "README.md",
        f"# Results ({spec.profile} profile)\n\n"
        "Made by `scripts/reproduce_table1.sh` (`hcgen table1`), protocol in `hcgen/experiments/table1/protocol.py`.\n\n"
        "- `table1.md` / `table1.json`: MNIST test error and error on the held-out adversarial set "
        "(14 types, generated from the MNIST test digits on every base net) per row, mean ± std over "
        "the row's nets and the training images per net, beside the paper's numbers; the PASS threshold "
        "tau and what it keeps of every row; Fig. 6's numbers; the claims of Sec. 5.2 checked with "
        "one-sided tests (paired where the nets pair, else Welch).\n"
        "- `stage_times.json`: seconds each stage's function ran (from its `.stage.json`).\n"
        + "".join(f"- `{name}`: {text}.\n" for name, text in figure_lines.items() if name in made)
        + reproduce
    )
    return {"table": text, "figures": made}

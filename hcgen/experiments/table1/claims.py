"""The claims of Sec. 5.2 of Rozsa et al. (CVPRW 2016) checked on Table 1's numbers, with the tests the design
calls for: fine-tuned rows paired by (base net, ordering), a row against Basic LeNet and the Fig. 6 bins
paired by base net, independent nets (InfiMNIST-style, from scratch) by Welch's test; one-sided, alpha 0.05.

`claims(numbers, bins)` takes the per-net numbers `hcgen.experiments.table1.results.table1` collects (or
`load_numbers` reads back from a table1.json); `claims_markdown` renders them as a table and its evidence.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ALPHA = 0.05  # one-sided tests of the claims (paired where the design pairs the nets, else Welch)


def _welch_less(a: list[float], b: list[float]) -> float:
    """One-sided Welch t-test p-value for mean(a) < mean(b) (nan when either side has < 2 values)."""
    from scipy import stats  # scipy: loaded only when used

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if np.std(a) == 0 and np.std(b) == 0:
        return 0.0 if np.mean(a) < np.mean(b) else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)


def _paired_less(a: list[float], b: list[float]) -> float:
    """One-sided paired t-test p-value for mean(a - b) < 0 over matched pairs (nan with < 2 pairs)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return float("nan")
    if np.all(d == d[0]):  # no spread: the sign decides
        return 0.0 if d[0] < 0 else 1.0
    return float(stats.ttest_rel(a, b, alternative="less").pvalue)


def _by_base(values: list[float], units: list) -> dict[int, float]:
    """Mean per base net of one row's values (units: [base net, ordering or None] per value)."""
    out: dict[int, list[float]] = {}
    for v, (base, _) in zip(values, units):
        out.setdefault(int(base), []).append(v)
    return {b: float(np.mean(v)) for b, v in out.items()}


def paired_values(x: dict, y: dict, col: str) -> tuple[list[float], list[float], str]:
    """The two rows' values of `col` matched for a paired test, and which pairing.

    Rows carry `units`, one [base net, ordering] per net (ordering None for Basic LeNet and the Fig. 6 bins,
    whose nets are the base nets or one fine-tune of each). Two fine-tuned rows pair by (base net,
    ordering): every row's fine-tunes start from the same base nets with the same ordering seeds. Otherwise
    each side is averaged over its orderings per base net and the rows pair by base net. Rows without units
    (nets not descended from the base nets, e.g. InfiMNIST-style from scratch) do not pair: ([], [], "")."""
    ux, uy = x.get("units"), y.get("units")
    if not ux or not uy:
        return [], [], ""
    if all(u[1] is not None for u in ux + uy):
        kx = {tuple(u): v for u, v in zip(ux, x[col])}
        ky = {tuple(u): v for u, v in zip(uy, y[col])}
        common = sorted(set(kx) & set(ky))
        return [kx[k] for k in common], [ky[k] for k in common], f"paired t over {len(common)} (base net, ordering) pairs"
    bx, by = _by_base(x[col], ux), _by_base(y[col], uy)
    common = sorted(set(bx) & set(by))
    return [bx[b] for b in common], [by[b] for b in common], f"paired t by base net (n = {len(common)})"


def _verdict(better: bool, p: float) -> str:
    if not better:
        return "does not hold"
    if not np.isfinite(p):
        return "holds (no test: one net)"
    return "holds" if p < ALPHA else "not significant"


def _overall(verdicts: list[str]) -> str:
    """A claim made of several comparisons holds when all do, fails when any goes the other way."""
    if all(v.startswith("holds") for v in verdicts):
        return "holds"
    return "does not hold" if any(v == "does not hold" for v in verdicts) else "not significant"


def compare(numbers: dict[str, dict], a: str, b: str, col: str) -> dict:
    """Is row `a` lower than row `b` on `col`? The verdict's test is paired where the design pairs the nets
    (`paired_values`), Welch's otherwise; the Welch p is reported beside a paired one."""
    x, y = numbers[a][col], numbers[b][col]
    better = float(np.mean(x)) < float(np.mean(y))
    welch = _welch_less(x, y)
    px, py, test = paired_values(numbers[a], numbers[b], col)
    if len(px) >= 2:
        p = _paired_less(px, py)
        shown = f"{test}: p={p:.3g}; Welch p={welch:.3g}"
    else:
        p, test = welch, "one-sided Welch t"
        shown = f"Welch p={p:.3g}"
    verdict = _verdict(better, p)
    return {"verdict": verdict, "p": p, "test": test, "better": better,
            "text": f"{a} {np.mean(x):.3f}% vs {b} {np.mean(y):.3f}% ({shown}): {verdict}"}


def _claim(cid: str, text: str, parts: list[dict], key: str) -> dict:
    tests = sorted({c["test"].split(" over ")[0].split(" (n")[0] for c in parts})
    ps = [c["p"] for c in parts]
    return {"id": cid, "claim": text, "verdict": _overall([c["verdict"] for c in parts]),
            "evidence": [c["text"] for c in parts], "key": key, "test": ", ".join(tests),
            "p": float(np.nanmax(ps)) if np.isfinite(ps).any() else float("nan")}


def claims(numbers: dict[str, dict], bins: dict[str, dict], basic: str = "Basic LeNet",
           infimnist: str = "InfiMNIST-style", only_rows: tuple = ("HC-D-9-1.05-only",)) -> list[dict]:
    """The claims of Sec. 5.2 checked on `numbers` (row -> {"mnist": [...], "adversarial": [...], "units":
    [[base net, ordering], ...]}, one value per net) and `bins` (Fig. 6: PASS range -> the same): each
    {"id", "claim", "verdict", "evidence", "key", "test", "p"}. A claim that a row is better holds when its
    mean is lower and the one-sided test gives p < ALPHA ("not significant": lower, p >= ALPHA); compound
    claims hold when every comparison does, and report the largest p. Tests are paired where the design
    pairs the nets (`paired_values`), Welch's otherwise. Ablation rows (`only_rows`) are not part of the
    paper's claims."""
    out = []
    numbers = {r: n for r, n in numbers.items() if r not in only_rows}
    mean = {r: (float(np.mean(n["mnist"])), float(np.mean(n["adversarial"]))) for r, n in numbers.items()}

    def row_means(rows, col):
        return ", ".join(f"{r} {mean[r][col]:.3f}%" for r in rows)

    adversarial_rows = [r for r in numbers if r not in (basic, infimnist)]
    if basic in numbers and adversarial_rows:
        parts = [compare(numbers, r, basic, col) for r in adversarial_rows for col in ("mnist", "adversarial")]
        worst_mnist = max(adversarial_rows, key=lambda r: mean[r][0])
        out.append(_claim("a", "every adversarially fine-tuned row beats Basic LeNet on both columns", parts,
                          f"Basic LeNet {mean[basic][0]:.3f}% / {mean[basic][1]:.2f}%; highest fine-tuned MNIST: "
                          f"{worst_mnist} {mean[worst_mnist][0]:.3f}%"))
    if "HC-D-9-1.05" in numbers and len(adversarial_rows) > 1:
        others = sorted((r for r in numbers if r != "HC-D-9-1.05"), key=lambda r: mean[r][1])
        part = compare(numbers, "HC-D-9-1.05", others[0], "adversarial")
        part["text"] = "against the next lowest row: " + part["text"]
        out.append(_claim("b", "HC-D-9-1.05 has the lowest adversarial error", [part],
                          f"HC-D-9-1.05 {mean['HC-D-9-1.05'][1]:.2f}% vs {others[0]} {mean[others[0]][1]:.2f}%"))
    if "FGS" in numbers:
        rows = [r for r in ("HC-D-9", "HC-D-9-1.05", "FGV") if r in numbers]
        if rows:
            out.append(_claim("c", "HC-D-9, HC-D-9-1.05 and FGV beat FGS on adversarial error",
                              [compare(numbers, r, "FGS", "adversarial") for r in rows],
                              f"FGS {mean['FGS'][1]:.2f}%; " + row_means(rows, 1)))
    if infimnist in numbers and adversarial_rows:
        out.append(_claim("d", f"the {infimnist} row does poorly on adversarial images "
                          "(worse than every adversarially fine-tuned row)",
                          [compare(numbers, r, infimnist, "adversarial") for r in adversarial_rows],
                          f"{infimnist} {mean[infimnist][1]:.2f}%; worst fine-tuned "
                          f"{max(mean[r][1] for r in adversarial_rows):.2f}%"))
    if "0.80-0.90" in bins and len(bins) > 2:
        keys = list(bins)
        parts = [compare(bins, "0.80-0.90", other, "adversarial") for other in (keys[0], keys[-1])]
        for c in parts:
            c["text"] = "PASS " + c["text"]
        bmean = {k: float(np.mean(v["adversarial"])) for k, v in bins.items()}
        out.append(_claim("e", "Fig. 6: training on the 0.8-0.9 PASS bin does better on adversarial "
                          "images than the lowest and the highest PASS bins", parts,
                          ", ".join(f"{k} {bmean[k]:.2f}%" for k in (keys[0], "0.80-0.90", keys[-1]))))
    return out


def load_numbers(table1_json: str | Path) -> tuple[dict, dict]:
    """(rows, bins) of a table1.json, with `units` inferred where an older hcgen did not write them: Basic
    LeNet's nets are the base nets 1..B, a fine-tuned row of B x O nets lists (base net, ordering) base net
    by base net, the InfiMNIST-style row (from scratch) and rows of unknown shape get none, the Fig. 6 bins
    hold base nets 1..n."""
    data = json.loads(Path(table1_json).read_text())
    rows, bins = data["rows"], data.get("bins", {})
    bases = len(rows.get("Basic LeNet", {}).get("mnist", []))
    for row, n in rows.items():
        if "units" in n:
            continue
        count = len(n["mnist"])
        if row == "Basic LeNet":
            n["units"] = [[b, None] for b in range(1, count + 1)]
        elif row != "InfiMNIST-style" and bases and count % bases == 0:
            n["units"] = [[b, o] for b in range(1, bases + 1) for o in range(1, count // bases + 1)]
    for n in bins.values():
        n.setdefault("units", [[b, None] for b in range(1, len(n["mnist"]) + 1)])
    return rows, bins


def claims_markdown(checked: list[dict], heading: str = "##") -> list[str]:
    """The claims as a table (claim, verdict, key numbers, test, p), the full evidence below it."""
    lines = ["| claim | verdict | key numbers (mean error) | test | p |", "|---|---|---|---|---|"]
    for c in checked:
        p = f"{c['p']:.3g}" if np.isfinite(c["p"]) else "—"
        lines.append(f"| ({c['id']}) {c['claim']} | **{c['verdict']}** | {c['key']} | {c['test']} | {p} |")
    lines += ["", f"{heading}# Evidence", "",
              f"One-sided tests, alpha = {ALPHA}. Fine-tuned rows are paired by (base net, ordering) (every row's "
              "fine-tunes start from the same base nets with the same ordering seeds); a row against Basic LeNet "
              "(or between Fig. 6 bins) is averaged over orderings and paired by base net; rows of independent "
              "nets (InfiMNIST-style, from scratch) use Welch's test. A compound claim reports its largest p. "
              "\"not significant\": the means go the paper's way but the test does not reject.", ""]
    for c in checked:
        lines.append(f"- **({c['id']}) {c['claim']}: {c['verdict']}.** " + "; ".join(c["evidence"]) + ".")
    return lines

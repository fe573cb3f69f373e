"""`hcgen report`: the gallery of a generation (the demo's), the Table 1 page, and the page in a real browser."""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from hcgen.data import genfolder
from hcgen.report import gallery
from hcgen.report import html as report_html
from hcgen.data.lmdb_io import read_lmdb

from tests.conftest import REPO, SHARED_MNIST, _read_idx

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


class Element:
    def __init__(self, tag: str, attrs: dict, parent: "Element | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list["Element"]:
        return [e for e in self.iter() if e.tag == tag and (cls is None or cls in e.classes)]


class Tree(HTMLParser):
    """A strict-enough DOM of the report: raises on unbalanced tags (void elements excepted)."""

    VOID = {"meta", "img", "br", "link", "input", "hr", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("#root", {}, None)
        self.styles: list[str] = []
        self._in_style = False
        self.feed(text)
        self.close()
        assert self.current is self.root, f"unclosed <{self.current.tag}>"

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in self.VOID:
            self.current = element
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.current.tag == tag, f"</{tag}> closes <{self.current.tag}>"
        self.current = self.current.parent
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def _decode(uri: str) -> np.ndarray:
    """A data: URI image decoded with Pillow (not OpenCV, which wrote it): (H, W) grey or (H, W, 3) RGB."""
    from PIL import Image

    head, _, payload = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    return np.asarray(image.convert("L" if image.mode in ("L", "1", "P") else "RGB"))


def _run_cli(*argv: str) -> tuple[int, str, str]:
    from hcgen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "benchmarks" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(trained_lenet, tmp_path_factory):
    """`hcgen demo` with a given net on 6 test digits: its output folder and what it printed."""
    out = tmp_path_factory.mktemp("demo")
    rc, stdout, _ = _run_cli("demo", "--weights", str(trained_lenet), "--limit", "6", "--out", str(out),
                             "--mnist", str(SHARED_MNIST))
    assert rc == 0
    return out, stdout


@pytest.fixture(scope="module")
def metadata(demo):
    return genfolder.load_generation(demo[0] / "adversarial_lmdb")


def test_demo_ends_with_its_report(demo):
    out, stdout = demo
    assert f"report (open it in a browser): {out / 'report.html'}" in stdout
    assert (out / "report.html").stat().st_size > 50_000


def test_gallery_holds_the_expected_examples(demo, metadata, tmp_path):
    """Per method and scale min(N, records) seeded examples, ten lowest and highest PASS, every method."""
    gen = metadata
    rc, stdout, _ = _run_cli("report", str(demo[0] / "adversarial_lmdb"), "--out", str(tmp_path / "r.html"),
                             "--per-method", "3", "--seed", "5")
    assert rc == 0 and f"report: {tmp_path / 'r.html'}" in stdout
    for path, per in ((demo[0] / "report.html", 12), (tmp_path / "r.html", 3)):
        tree = Tree(path.read_text())
        sections = {s.attrs["data-method"]: s for s in tree.root.find_all("section", "method")}
        assert list(sections) == gen.methods and len(gen.methods) == 20  # the demo's FGS, FGV, HC-D-1..9, HC-S-1..9
        for m, section in sections.items():
            grids = {g.attrs["data-scale"]: g for g in section.find_all("div", "sample")}
            assert set(grids) == {"1", "1.05", "1.1"}
            for scale, grid in grids.items():
                n = int(((gen.method == m) & np.isclose(gen.scale, float(scale))).sum())
                assert len(grid.find_all("figure", "ex")) == min(per, n) > 0, (m, scale)
            n = int((gen.method == m).sum())
            low, high = section.find_all("div", "low"), section.find_all("div", "high")
            assert len(low[0].find_all("figure")) == len(high[0].find_all("figure")) == min(10, n)
            low_pass = [float(gen.pass_[gen.key == int(f.attrs["data-key"])][0]) for f in low[0].find_all("figure")]
            assert low_pass == sorted(low_pass) and low_pass[0] == gen.pass_[gen.method == m].min()
    # the same seed draws the same examples; another seed others
    def sample_keys(path: Path) -> list[str]:
        return [f.attrs["data-key"] for g in Tree(path.read_text()).root.find_all("div", "sample")
                for f in g.find_all("figure", "ex")]

    def write(seed: int) -> Path:
        return gallery.write_generation_report(demo[0] / "adversarial_lmdb", tmp_path / f"{seed}.html", 3, seed).path

    assert sample_keys(write(5)) == sample_keys(tmp_path / "r.html") != sample_keys(write(6))


def test_inlined_images_are_the_records_exact_pixels(demo):
    """Each card's adversarial is the LMDB record at its key, its original the MNIST test digit (read from the
    IDX file, independently of hcgen), and its perturbation grey exactly where they agree."""
    keys, images, _ = read_lmdb(demo[0] / "adversarial_lmdb")
    digits = _read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    cards = Tree((demo[0] / "report.html").read_text()).root.find_all("figure", "ex")
    checked = 0
    for card in cards:
        imgs = {next(iter(i.classes & {"orig", "adv", "delta"})): i for i in card.find_all("img")}
        if "adv" not in imgs:  # a misclassified source image
            continue
        record = images[keys.index(f"{int(imgs['adv'].attrs['data-key']):08d}"), 0]
        original = digits[int(imgs["orig"].attrs["data-source"])]
        np.testing.assert_array_equal(_decode(imgs["adv"].attrs["src"]), record)
        np.testing.assert_array_equal(_decode(imgs["orig"].attrs["src"]), original)
        delta = _decode(imgs["delta"].attrs["src"]).astype(int)
        diff = record.astype(int) - original
        assert (delta[diff == 0] == 128).all() and (delta[diff > 0] > 128).all() and (delta[diff < 0] < 128).all()
        assert np.abs(delta - 128).max() == 127  # scaled to the largest change
        checked += 1
    assert checked > 200


def _external_references(text: str) -> list[str]:
    tree = Tree(text)
    bad = [f"<{e.tag}>" for e in tree.root.iter() if e.tag in ("script", "link", "iframe", "object", "embed", "base",
                                                                "frame", "audio", "video", "source", "form")]
    for e in tree.root.iter():
        for name, value in e.attrs.items():
            if name.startswith("on"):
                bad.append(f"{e.tag}[{name}]")
            if name in ("src", "href", "srcset", "action", "data", "poster", "background", "xlink:href", "ping",
                        "cite", "longdesc", "formaction", "manifest") and not value.startswith(("data:", "#")):
                bad.append(f"{e.tag}[{name}={value[:60]}]")
            if name == "style" and "url(" in value:
                bad.append(f"{e.tag}[style={value[:60]}]")
    css = "".join(tree.styles)
    bad += [m for m in re.findall(r"url\([^)]*\)|@import", css) if not m.startswith("url(data:")]
    return bad


def test_report_refers_to_nothing_outside_the_file(demo):
    text = (demo[0] / "report.html").read_text()
    assert _external_references(text) == []
    assert "http://" not in text and "https://" not in text


def test_colour_records_are_shown_in_rgb_order():
    """Caffe colour Datums are BGR; image files are RGB: a pure blue BGR pixel must decode as (0, 0, 255)."""
    bgr = np.zeros((3, 4, 5), np.uint8)
    bgr[0] = 255  # B
    bgr[2, 1, 2] = 200  # some red at one pixel
    rgb = _decode(report_html.encode_image(bgr))
    assert rgb.shape == (4, 5, 3)
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 255])
    np.testing.assert_array_equal(rgb[1, 2], [200, 0, 255])
    np.testing.assert_array_equal(rgb[..., ::-1].transpose(2, 0, 1), bgr)  # lossless
    big = np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)
    uri = report_html.encode_image(big)
    assert uri.startswith("data:image/jpeg") and _decode(uri).shape == (128, 128, 3)
    with pytest.raises(ValueError, match=r"expected a \(1 or 3, H, W\) uint8 image"):
        report_html.encode_image(np.zeros((2, 4, 4), np.uint8))


def test_report_errors(demo, tmp_path):
    gen = demo[0] / "adversarial_lmdb"
    rc, _, err = _run_cli("report", str(tmp_path))
    assert rc == 2 and "is neither an `hcgen generate` output (no generate.json) nor a Table 1 work folder" in err
    rc, _, err = _run_cli("report", str(gen), "--per-method", "-1", "--out", str(tmp_path / "x.html"))
    assert rc == 2 and "--per-method must be >= 0" in err
    rc, _, err = _run_cli("report", str(gen), "--source", str(tmp_path / "moved"), "--out", str(tmp_path / "x.html"))
    assert rc == 2 and "are not here; pass --source" in err
    rc, _, err = _run_cli("report", str(gen), "--results", str(tmp_path))
    assert rc == 2 and "--results is for Table 1 work folders" in err


# --- a Table 1 work folder, built from files (as `hcgen table1` leaves them) ------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A Table 1 work folder as the stage runner leaves it: stage folders with markers, two small
    synthetic generations in gen-*/lmdb, an unfinished stage, and the results of docs/table1-quick."""
    root = tmp_path_factory.mktemp("table1work")
    work = root / "quick"
    bench = _bench_report()
    stages = [("mnist", 3.0), ("base1", 250.0), ("gen-train1", 120.0), ("gen-test1", 60.0), ("heldout", 2.0),
              ("eval-base1", 4.0)]
    t = 1_700_000_000.0
    for i, (name, seconds) in enumerate(stages):
        folder = work / f"{name}-{i:010x}"
        folder.mkdir(parents=True)
        if name.startswith("gen-"):
            bench.synthetic_generation(folder / "lmdb", 300, str(SHARED_MNIST), seed=i, methods="fgs,hc-d:1-2")
        started = t if name in ("gen-train1", "gen-test1") else t + 10 * i
        (folder / ".stage.json").write_text(json.dumps(
            {"stage": name, "params": {}, "started": started, "seconds": seconds, "host": "testhost", "pid": 1}))
        t = max(t, started + seconds)
    (work / "ft-FGS-net1-order1-00000000ff").mkdir()  # running: no marker yet
    shutil.copytree(REPO / "docs" / "table1-quick", work / "results")
    return work


def test_table1_page_from_the_files_of_a_work_folder(work, tmp_path):
    out = tmp_path / "site" / "report.html"
    rc, stdout, _ = _run_cli("report", str(work.parent), "--out", str(out))  # the folder of profiles works too
    assert rc == 0, stdout
    text = out.read_text()
    tree = Tree(text)
    table = tree.root.find_all("table", "table1")[0]
    cells = [[c for c in row.find_all("td")] for row in table.find_all("tr")[1:]]
    assert len(cells) == 8 and "| .937% ± .110 | 64.21% |" in (work / "results" / "table1.md").read_text()
    assert ".937% ± .110" in text and "InfiMNIST-style" in text  # the paper's numbers beside ours
    figures = [i for i in tree.root.find_all("img", "fig")]
    names = sorted(p.name for p in (work / "results").glob("*.png"))
    assert [i.attrs["alt"] for i in figures] == names
    for img, name in zip(figures, names):
        assert base64.b64decode(img.attrs["src"].partition(",")[2]) == (work / "results" / name).read_bytes()
    assert "not finished" in text and "ft-FGS-net1-order1" in text and "testhost" in text
    # links: only in-page anchors and the two galleries written beside the page
    links = [a.attrs["href"] for a in tree.root.find_all("a") if not a.attrs["href"].startswith("#")]
    galleries = sorted({h for h in links})
    assert galleries == sorted(f"report-{p.name}.html" for p in work.glob("gen-*"))
    for name in galleries:
        assert (out.parent / name).exists() and f"gallery: {out.parent / name}" in stdout
        page = Tree((out.parent / name).read_text())
        assert [s.attrs["data-method"] for s in page.root.find_all("section", "method")] == ["FGS", "HC-D-1", "HC-D-2"]
        assert _external_references((out.parent / name).read_text()) == []
    assert sorted(_external_references(text)) == sorted(f"a[href={h}]" for h in links)  # the galleries only


def test_table1_page_finds_or_asks_for_the_results(work, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(work, tmp_path / "quick", ignore=shutil.ignore_patterns("results"))
    shutil.copytree(work / "results", moved)
    rc, _, _ = _run_cli("report", str(tmp_path / "quick"), "--out", str(tmp_path / "a.html"))
    assert rc == 0 and "No <code>table1.md</code>" in (tmp_path / "a.html").read_text()
    rc, _, _ = _run_cli("report", str(tmp_path / "quick"), "--out", str(tmp_path / "b.html"), "--results", str(moved))
    assert rc == 0 and "InfiMNIST-style" in (tmp_path / "b.html").read_text()
    rc, _, err = _run_cli("report", str(tmp_path / "quick"), "--results", str(tmp_path))
    assert rc == 2 and "no table1.md in --results" in err
    (tmp_path / "two" / "a" / "s-0000000000").mkdir(parents=True)
    (tmp_path / "two" / "a" / "s-0000000000" / ".stage.json").write_text("{}")
    shutil.copytree(tmp_path / "two" / "a", tmp_path / "two" / "b")
    rc, _, err = _run_cli("report", str(tmp_path / "two"))
    assert rc == 2 and "holds the Table 1 work folders of several profiles (a, b)" in err


# --- in a real browser -------------------------------------------------------------------------------

def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if ON_CI:
            pytest.fail("chromium is not installed on CI; scripts/debian-packages.txt lists it "
                        "(bash scripts/bootstrap.sh test installs it)")
        pytest.skip("chromium is not installed (it is in scripts/debian-packages.txt; on CI this test must run)")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)


def test_chromium_renders_the_demo_report(demo, tmp_path):
    """Headless Chromium lays the page out (a copy with one probe script measures its height and checks
    every image decoded), then screenshots it at that height: the PNG has the page's height and is not
    blank from top to bottom."""
    from PIL import Image

    report = demo[0] / "report.html"
    text = report.read_text()
    n_images = text.count("<img ")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>document.title = [document.documentElement.scrollHeight, "
                                  "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
                                  "].join(' ')</script></body>"))
    width = 1280
    dom = _chromium(tmp_path, f"--window-size={width},1000", "--dump-dom", probe.as_uri()).stdout
    height, decoded = map(int, re.search(r"<title>(\d+) (\d+)</title>", dom).groups())
    assert decoded == n_images > 300  # every inlined image decodes in the browser
    assert height > 5000
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--window-size={width},{height}", f"--screenshot={shot}", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (height, width, 3)
    background = np.array([0xF6, 0xF7, 0xF9])
    rows_with_content = (np.abs(pixels - background).sum(axis=2) > 30).mean(axis=1) > 0.01
    for part in np.array_split(rows_with_content, 10):  # content all the way down, not only at the top
        assert part.mean() > 0.3
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 100  # images and figures, not just text


# --- the fixes that came with it ---------------------------------------------------------------------

def test_version():
    out = subprocess.run([sys.executable, "-m", "hcgen.cli", "--version"], capture_output=True, text=True, check=True)
    from hcgen import __version__

    assert out.stdout.strip() == f"hcgen {__version__}"


def test_progress_bars_stay_off_without_a_terminal(tmp_path):
    """stderr is a pipe here (as in Docker, CI and Dask logs): no carriage-return updates anywhere."""
    out = subprocess.run([sys.executable, "-m", "hcgen.cli", "data", "infimnist", "--count", "40", "--source",
                          str(SHARED_MNIST), "--out", str(tmp_path / "inf")], capture_output=True, text=True,
                         check=True)
    assert "40 records" in out.stdout
    assert "\r" not in out.stdout + out.stderr and "infimnist-style:" not in out.stderr


def test_doctor_names_the_blas_caffe_links():
    """Not the BLAS numpy or scipy load into the process (scipy's bundled OpenBLAS), but libcaffe's."""
    from hcgen.backends import caffe_checks
    from hcgen.commands.doctor import caffe_blas

    info = caffe_checks.build_info()
    blas = caffe_blas(info["caffe_native"])
    assert "linked by libcaffe" in blas and "scipy" not in blas, blas
    assert Path(blas.split(" => ")[1].split(" (")[0]).is_file()

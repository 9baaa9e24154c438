"""The HTML report: seven sections in order, self-contained, escaped, robust to missing images."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from splitaudit.report.html import image_uri, render_report, write_report
from splitaudit.report.plots import pareto_front
from splitaudit.results import AuditResult, CutInfo, ResultRow

EVIL = "<script>alert(1)</script>\"' onmouseover='alert(2)' $x^2$"
SECTIONS = ["verdict", "curve", "tradeoff", "images", "costs", "threat", "repro"]


# --- pareto_front ------------------------------------------------------------------------------------
def test_pareto_front_2d():
    pts = [(0.9, 0.0), (0.2, 5.0), (0.5, 1.0), (0.6, 1.0), (0.2, 6.0), (0.1, 9.0)]
    assert pareto_front(pts) == [0, 1, 2, 5]


def test_pareto_front_keeps_duplicates_and_drops_nan():
    pts = [(0.3, 1.0), (0.3, 1.0), (math.nan, 0.0), (0.4, 2.0)]
    assert pareto_front(pts) == [0, 1]


def test_pareto_front_3d_and_edges():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0, 1.0)]) == [0]
    pts = [(0.5, 0.0, 1.0), (0.5, 0.0, 0.5), (0.1, 3.0, 2.0), (0.6, 0.1, 0.6)]
    assert pareto_front(pts) == [1, 2]
    with pytest.raises(ValueError):
        pareto_front([(1.0, 2.0), (1.0,)])


# --- a hand-built result -------------------------------------------------------------------------------
def _png(path: Path, shade: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (120, 40), (shade, shade, shade))
    img.paste((255, 255, 255), (10, 10, 30, 30))
    img.save(path, format="PNG")
    return path.name


def _row(cut, defense, ssim, *, adaptive=False, images=None, acc=0.98, **kw) -> ResultRow:
    return ResultRow(
        cut=cut, defense=defense, attack="decoder", adaptive=adaptive, ssim=ssim, ssim_ci=(ssim - 0.01, ssim + 0.01),
        psnr=10 + 10 * ssim, psnr_ci=(9.5 + 10 * ssim, 10.5 + 10 * ssim), baseline_ssim=0.12, baseline_psnr=9.0, n_eval=200,
        accuracy=acc, agreement=1.0 if defense == "none" else 0.96, latency_ms=0.05 + 0.01 * len(cut), latency_overhead_ms=0.0 if defense == "none" else 0.01,
        worst_ssim=min(1.0, ssim + 0.1), bytes_per_sample=1024, images=images, **kw,
    )


def make_result(base: Path, *, cut0: str = "conv1", cut1: str = "conv2", model: str = "builtin:lenet",
                defense: str = "noise:sigma=1", img_prefix: str = "images/") -> AuditResult:
    (base / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cut in enumerate((cut0, cut1)):
        p = _png(base / "images" / f"c{i}_none.png", 40)
        rows.append(_row(cut, "none", 0.86 - 0.3 * i, images=img_prefix + p))
        p = _png(base / "images" / f"c{i}_noise_ad.png", 80)
        rows.append(_row(cut, defense, 0.35 - 0.1 * i, adaptive=True, images=img_prefix + p, acc=0.95))
        p = _png(base / "images" / f"c{i}_noise.png", 120)
        rows.append(_row(cut, defense, 0.25 - 0.1 * i, images=img_prefix + p, acc=0.95))
    rows.append(_row(cut1, "dpsgd:epsilon=8", 0.2, acc=0.9, epsilon=8.0, delta=1e-5, flags=("leaks less than the deeper cut x",),
                     defense_info={"epsilon": 8.0, "delta": 1e-5, "accuracy_before": 0.98, "accuracy_after": 0.9,
                                   "changed_layers": ["fc1"], "note": "DP-SGD bounds what the weights reveal about the training data, "
                                   "not what an activation reveals about an inference input."}))
    cuts = (
        CutInfo(name=cut0, shape=(6, 24, 24), bytes_per_sample=13824, head_flops=86400, head_latency_ms=0.03, index=0, module_type="Conv2d"),
        CutInfo(name=cut1, shape=(16, 8, 8), bytes_per_sample=4096, head_flops=240000, head_latency_ms=0.06, index=1, module_type="Conv2d"),
    )
    return AuditResult(
        created="2025-01-01T00:00:00+00:00", seed=7,
        model={"spec": model, "hash": "abc123"},
        data={"spec": "builtin:mnist", "n_victim": 3000, "n_aux": 1000, "n_eval": 200, "hash": "def456", "license": "CC BY-SA 3.0"},
        environment={"python": "3.11", "torch": "2.13", "device": "cpu", "threads": 2, "splitaudit": "0.1.0"},
        cuts=cuts, results=tuple(rows),
        config={"profile": "quick", "defenses": ["none", defense], "attacks": ["decoder"], "cuts": [cut0, cut1],
                "threshold": 0.3, "command": f"splitaudit audit --model {model}", "skipped_cuts": [["relu9", "not a tensor"]], "seconds": 1.0},
        threshold=0.3, notes=("a note from the run",),
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("res")
    result = make_result(base)
    return result, base, render_report(result, base=base)


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    base = tmp_path_factory.mktemp("evil")
    result = make_result(base, cut0=EVIL, cut1="b\"a'd&<b>", model=f"{EVIL}.py:build", defense=f"noise:sigma=1,{EVIL}")
    result = replace(
        result,
        data={**result.data, "spec": EVIL},
        notes=(EVIL,),
        config={**result.config, "command": f"splitaudit audit --model '{EVIL}'"},
        results=result.results + (_row("conv1", "none", 0.5, images=f"images/{EVIL}.png"),),
    )
    return result, base, render_report(result, base=base)


def _visible_text(page: str) -> str:
    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.out, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag == "style"

        def handle_endtag(self, tag):
            self.skip -= tag == "style"

        def handle_data(self, data):
            if not self.skip:
                self.out.append(data)

    p = P()
    p.feed(page)
    return re.sub(r"\s+", " ", "".join(p.out))


def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return _visible_text(page[start : page.index("</section>", start)])


def _tags(page: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, attrs))

    p = P()
    p.feed(page)
    return p.tags


# --- contents ------------------------------------------------------------------------------------------
def test_seven_sections_in_order(rendered):
    _, _, page = rendered
    positions = [page.index(f'<section id="{s}">') for s in SECTIONS]
    assert positions == sorted(positions)
    assert page.count("<section") == 7


def test_verdict_sentences_per_cut(rendered):
    result, _, page = rendered
    text = _section(page, "verdict")
    # undefended: recognizable at conv1 with SSIM and interval against the threshold
    assert "After conv1 with no defense, inputs are rebuilt recognizably (SSIM 0.860 [0.850, 0.870], threshold 0.30)" in text
    # best defense: the strongest (adaptive) attack is the headline, not the weaker non-adaptive one
    assert "After conv1 with noise:sigma=1" in text
    assert "inputs are rebuilt recognizably (SSIM 0.350 [0.340, 0.360]" in text
    assert "Strongest attack: decoder (adaptive)" in text
    # at conv2 dpsgd leaks least (0.2 < 0.25) but its row is flagged as a lower bound: no conclusion, so it
    # is never shown as the most protective defense; the one the ladder concluded on is
    assert "After conv2 with dpsgd:epsilon=8" not in text
    assert "After conv2 with noise:sigma=1" in text and "not recognizable by the attacks run (SSIM 0.250" in text
    assert "Without a defense, 2 of 2 cuts" in text
    assert not re.search(r"\bsafe\b", text, re.I)


def test_tables_caveats_and_reproducibility(rendered):
    _, _, page = rendered
    trade = _section(page, "tradeoff")
    pareto = trade[trade.index("Pareto-optimal pairs") :]
    # conv2 beats conv1 at equal cost for none and for noise; dpsgd buys the lowest SSIM for 8 points
    assert [c for c in ("conv1", "conv2") if c in pareto] == ["conv2"]
    assert pareto.count("conv2") == 3 and "dpsgd:epsilon=8" in pareto and "8.0 points" in pareto
    costs = _section(page, "costs")
    for s in ("1.00", "0.086", "0.0300", "Conv2d", "95.0%", "96.0%", "8.00", "1e-05"):
        assert s in costs, s
    threat = _section(page, "threat")
    assert "black-box decoder attacker" in threat and "disjoint" in threat
    assert "Adaptive vs non-adaptive gap" in threat and "+0.100" in threat
    assert "not what an activation reveals about an inference input" in threat
    assert "leaks less than the deeper cut x" in threat and "a note from the run" in threat
    assert "relu9" in threat
    # dpsgd was only attacked non-adaptively: said so
    assert "only against a non-adaptive attacker" in threat
    repro = _section(page, "repro")
    for s in ("splitaudit audit --model builtin:lenet", "abc123", "def456", "threads", "2.13", "seed", "CC BY-SA 3.0"):
        assert s in repro, s


def test_self_contained(rendered):
    _, _, page = rendered
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page and "@import" not in page
    tags = _tags(page)
    images = [dict(a)["src"] for t, a in tags if t == "img"]
    assert len(images) == 2 + 6  # two plots, one grid per row (the dpsgd row has no image)
    assert all(src.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,")) for src in images)
    assert all(dict(a).get("href", "#").startswith("#") for t, a in tags if t == "a")
    for t, attrs in tags:
        for k, v in attrs:
            assert not k.startswith("on"), (t, k)
            if k in ("src", "href", "action", "srcset", "poster", "data"):
                assert v.startswith(("data:", "#")), (t, k, v)
    # the plots themselves: SVG that references nothing outside itself and carries no script
    for src in images:
        if src.startswith("data:image/svg+xml"):
            svg = base64.b64decode(src.split(",", 1)[1]).decode()
            assert "<script" not in svg and "<image" not in svg
            assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', svg))
        else:
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_escapes_user_names(evil):
    _, _, page = evil
    low = page.lower()
    assert "<script" not in low
    assert "alert(1)" in page  # the text is there ...
    assert html.escape("<script>alert(1)</script>", quote=False) in page  # ... escaped
    assert "onmouseover='alert(2)'" not in page and "<b>" not in page
    for t, attrs in _tags(page):
        assert t != "script" and t != "b"
        for k, _ in attrs:
            assert not k.startswith("on"), (t, k)
    text = _visible_text(page)
    assert EVIL in text  # shown to the reader as written
    assert "b\"a'd&<b>" in text
    # a missing image whose name is hostile: a placeholder, escaped
    assert "is missing" in text


def test_missing_and_foreign_images_are_placeholders(tmp_path):
    result = make_result(tmp_path)
    (tmp_path / result.results[0].images).unlink()
    (tmp_path / result.results[1].images).write_bytes(b"<svg onload=alert(1)>")
    outside = tmp_path.parent / "outside.png"
    _png(outside, 10)
    rows = list(result.results)
    rows[2] = replace(rows[2], images="../outside.png")
    page = render_report(replace(result, results=tuple(rows)), base=tmp_path)
    text = _visible_text(page)
    assert "is missing" in text and "not a PNG file" in text and "leaves the results folder" in text
    assert "onload" not in page
    assert image_uri(None, "images/x.png")[0] is None
    assert image_uri(tmp_path, None)[1] == "no image was saved for this row"
    # without the results folder: every grid is a placeholder, and the page still renders
    page = render_report(result, base=None)
    assert page.count("data:image/png") == 0 and "rendered without the results folder" in page


def test_minimal_result_renders(tmp_path):
    result = AuditResult(created="now", seed=0, model={}, data={}, environment={}, cuts=(), results=())
    page = render_report(result)
    assert all(f'<section id="{s}">' in page for s in SECTIONS)
    assert "No result rows" in page


def test_failed_and_nan_rows(tmp_path):
    result = make_result(tmp_path)
    rows = list(result.results)
    rows[1] = replace(rows[1], latency_overhead_ms=-0.5)
    rows[0] = replace(rows[0], status="failed", error="boom <i>", ssim=math.nan, ssim_ci=(math.nan, math.nan), psnr=math.nan,
                      psnr_ci=(math.nan, math.nan), accuracy=None, agreement=None)
    page = render_report(replace(result, results=tuple(rows)), base=tmp_path)
    text = _visible_text(page)
    assert "the attack failed" in text and "boom <i>" in text and "<i>" not in page
    assert "within timing noise" in text


def test_cli_report_roundtrip(tmp_path):
    from splitaudit.cli import main as cli_main

    result = make_result(tmp_path)
    result.save(tmp_path / "results.json")
    out = tmp_path / "again.html"
    assert cli_main(["report", str(tmp_path / "results.json"), "-o", str(out)]) == 0
    page = out.read_text()
    # the same bytes as a render from the in-memory result: reproducible, and deterministic across renders
    assert write_report(result, tmp_path / "w.html", base=tmp_path).read_text() == page
    assert page.count("data:image/png;base64,") == 6
    assert out.stat().st_size < 1_000_000


def test_browser_test_skips_locally_but_fails_under_ci(monkeypatch):
    from tests import test_report_browser as tb

    monkeypatch.setattr(tb, "CANDIDATES", ("/nonexistent/chromium",))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        tb.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        tb.require_chromium()

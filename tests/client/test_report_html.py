"""report.html and index.html as text: self-contained, escaped, the sections present.
(tests/client/test_report_browser.py loads them in a real Chromium.)"""

from __future__ import annotations

import dataclasses
import html.parser
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from client_fakes import collect_result

from histohelper.client import SlideResult
from histohelper.client.explain import PatchExplanation
from histohelper.client.report import write_cohort_index, write_report

EVIL = '<script>alert("x")</script> & "quoted" \'single\'.svs'


def make_result(**kw: object) -> SlideResult:
    return collect_result(**kw)


class _Tags(html.parser.HTMLParser):
    """Collects start tags with their attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def with_cams(result: SlideResult) -> SlideResult:
    n = result.patch_count
    rng = np.random.default_rng(0)
    cams = rng.normal(size=(n, len(result.class_names), 7, 7)).astype(np.float32)
    patches = dataclasses.replace(result.patches, cams=cams, logits=cams.mean(axis=(2, 3)))
    return dataclasses.replace(result, patches=patches)


def explanation(result: SlideResult, i: int, rank: int) -> PatchExplanation:
    p = result.patches
    ok, jpeg = cv2.imencode(".jpg", np.full((224, 224, 3), 200, np.uint8))
    assert ok
    return PatchExplanation(
        patch_index=int(p.patch_index[i]), row=int(p.row[i]), col=int(p.col[i]),
        x_l0=float(p.x_l0[i]), y_l0=float(p.y_l0[i]), width_l0=float(p.width_l0[i]),
        height_l0=float(p.height_l0[i]), image_jpeg=jpeg.tobytes(), class_name="tumor",
        probabilities=p.probabilities[i], attention=float(p.attention[i]),
        grad_cam=np.random.default_rng(i).random((7, 7)).astype(np.float32), rank=rank,
        score=float(p.attention[i]), class_probability=float(p.probabilities[i, 0]),
    )  # fmt: skip


def test_report_is_self_contained_and_escapes_the_slide_name(tmp_path: Path) -> None:
    path = write_report(make_result(), tmp_path, slide_name=EVIL)
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()  # no script at all, and the name is escaped
    page = parse(path)
    assert EVIL in "".join(page.text)  # shown literally
    csp = [a["content"] for t, a in page.tags if t == "meta" and "content" in a]
    assert any(c and c.startswith("default-src 'none'") for c in csp)
    imgs = [a for t, a in page.tags if t == "img"]
    assert imgs and all(str(a["src"]).startswith("data:image/") for a in imgs)
    links = [a for t, a in page.tags if t in ("link", "script", "iframe", "object")]
    assert links == []
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)


def test_report_sections(tmp_path: Path) -> None:
    page = parse(write_report(make_result(), tmp_path))
    text = " ".join(page.text)
    for heading in ("Slide", "Heatmaps", "Top patches", "Quality control", "Model", "Timings"):
        assert heading in text
    assert "UNTRAINED: the model is untrained" in text
    assert "Slide prediction" in text and "positive" in text
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert alts == ["slide thumbnail", "tissue mask", "probability overlay", "attention overlay"]
    no_att = parse(write_report(make_result(attention=False), tmp_path / "b"))
    assert "attention overlay" not in [a["alt"] for t, a in no_att.tags if t == "img"]


def test_report_with_cams_and_a_grad_cam_gallery(tmp_path: Path) -> None:
    result = with_cams(make_result())
    gallery = [explanation(result, i, rank) for rank, i in enumerate((3, 0, 5))]
    page = parse(write_report(result, tmp_path, explanations=gallery, cam_class="tumor"))
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert "CAM overlay" in alts
    assert [a for a in alts if a.startswith("Grad-CAM of patch")] == [
        f"Grad-CAM of patch {ex.patch_index}" for ex in gallery
    ]


def test_report_names_the_untrained_parts(tmp_path: Path) -> None:
    result = make_result()
    mil_only = dataclasses.replace(
        result, model=dataclasses.replace(result.model, untrained_parts=("mil",))
    )
    text = " ".join(parse(write_report(mil_only, tmp_path)).text)
    assert "untrained (seeded random initialisation): MIL slide head" in text
    assert "the slide prediction and attention mean nothing" in text
    trained = dataclasses.replace(result, model=dataclasses.replace(result.model, untrained=False))
    text = " ".join(parse(write_report(trained, tmp_path / "t")).text)
    assert "UNTRAINED" not in text


def test_report_shows_the_mc_dropout_uncertainty(tmp_path: Path) -> None:
    from histohelper.client.events import SlideUncertainty

    result = make_result()
    assert result.prediction is not None
    u = SlideUncertainty(mean=(0.3, 0.7), std=(0.05, 0.05), entropy_nats=0.61, passes=16)
    with_u = dataclasses.replace(
        result, prediction=dataclasses.replace(result.prediction, uncertainty=u)
    )
    text = " ".join(parse(write_report(with_u, tmp_path)).text)
    assert "MC dropout (16 passes)" in text and "0.610 nats" in text
    assert "0.700 ± 0.050" in text


def test_report_without_tissue(tmp_path: Path) -> None:
    page = parse(write_report(make_result(no_tissue=True), tmp_path))
    assert "No tissue found" in " ".join(page.text)


def test_report_refuses_unknown_style(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="colour map"):
        write_report(make_result(), tmp_path, colormap="rainbow")


def test_cohort_index_links_reports_and_escapes(tmp_path: Path) -> None:
    rows = [
        {"id": "s1", "status": "done", "report": "s1/report.html", "probability": "0.9"},
        {"id": EVIL, "status": "done", "report": "odd id/report #1.html", "probability": "0.1"},
        {"id": "abs", "status": "done", "report": "/etc/passwd"},
        {"id": "js", "status": "done", "report": "javascript:alert(1)"},
        {"id": "up", "status": "done", "report": "../elsewhere/report.html"},
        {"id": "bad", "status": "failed", "report": "", "error": "slide not found"},
    ]
    path = write_cohort_index(tmp_path, rows)
    assert path == tmp_path / "index.html"
    page = parse(path)
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert hrefs == ["s1/report.html", "odd%20id/report%20%231.html"]
    headers = [
        d.strip() for d in page.text if d.strip() in ("id", "status", "report", "probability")
    ]
    assert headers[:4] == ["id", "status", "report", "probability"]
    text = "".join(page.text)
    assert EVIL in text and "/etc/passwd" in text and "javascript:alert(1)" in text
    assert path.read_text().count("<script>") == 1  # the sorter only


def test_cohort_index_needs_id_status_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks report"):
        write_cohort_index(tmp_path, [{"id": "a", "status": "done"}])


def test_cohort_index_columns_follow_the_table_and_skip_empty_ones(tmp_path: Path) -> None:
    rows = [
        {"slide": "x.svs", "id": "x", "error": "", "status": "done", "p": "0.2", "report": ""},
        {"slide": "y.svs", "id": "y", "error": None, "status": "done", "p": "0.7", "report": ""},
    ]
    page = parse(write_cohort_index(tmp_path, rows, columns=["p", "slide", "error"]))
    text = [d.strip() for d in page.text if d.strip()]
    assert text[text.index("id") : text.index("id") + 5] == ["id", "status", "report", "p", "slide"]
    assert "error" not in text  # empty in every row

"""HTML reports: ``report.html`` for one analysed slide, ``index.html`` for a cohort.

:func:`write_report` writes one self-contained file: every image is embedded as a
``data:`` URI, the style sheet is inline, there is no script, and a Content Security
Policy (``default-src 'none'``) forbids the browser any fetch, so the page reads the
same from a USB stick, an e-mail attachment or an air-gapped workstation. It shows the
thumbnail and tissue mask, the probability and attention overlays side by side, the
top patches (with their Grad-CAM images when ``histohelper explain`` passes them), the
quality-control block and warnings, the slide prediction with its uncertainty, a model
card and the timings.

:func:`write_cohort_index` writes ``index.html``: one row per slide, sortable by
clicking a column header (a few lines of inline script), linking each slide's report.

Every string that reaches the page is escaped with :func:`html.escape`: slide names
and ids are user data. Images are drawn by :mod:`histohelper.client.render` (OpenCV,
imported lazily); this module itself needs only the standard library and numpy.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from histohelper import __version__
from histohelper.client import styles
from histohelper.model_parts import describe_untrained, untrained_warning

if TYPE_CHECKING:
    from histohelper.client.explain import PatchExplanation
    from histohelper.client.result import SlideResult

StrPath = str | PathLike[str]

REPORT_NAME = "report.html"
INDEX_NAME = "index.html"

#: Patches listed in the report's top-patch table when no explanations are given.
DEFAULT_TOP_K = 8

_CSP_REPORT = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSP_INDEX = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  color: #1b1b1b; background: #f6f6f4; }
main { max-width: 1500px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { font-size: 1.5em; margin: 8px 0 4px; word-break: break-all; }
h2 { font-size: 1.15em; margin: 26px 0 8px; border-bottom: 1px solid #ccc; padding-bottom: 3px; }
.sub { color: #555; margin: 0 0 8px; }
.banner { background: #b00020; color: #fff; padding: 8px 12px; font-weight: 600;
  border-radius: 4px; margin: 8px 0; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; }
.prediction { font-size: 1.25em; }
.prediction b { font-size: 1.2em; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.row > figure { flex: 1 1 420px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #444; font-size: 0.9em; margin-top: 6px; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#cohort { font-size: 0.9em; }
#cohort td { max-width: 26em; }
#cohort td.long { min-width: 18em; }
#cohort th { cursor: pointer; white-space: nowrap; }
#cohort th[aria-sort="ascending"]::after { content: " \\25B2"; }
#cohort th[aria-sort="descending"]::after { content: " \\25BC"; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.gallery figure img { width: 49%; display: inline-block; }
.warn { color: #8a4b00; }
.ok { color: #1e6b1e; }
footer { color: #666; font-size: 0.85em; margin-top: 30px; }
"""

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) { return row.cells[col] ? row.cells[col].textContent.trim() : ""; }
      var numeric = rows.every(function (r) { var k = key(r); return k === "" || isFinite(k); });
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var d = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value: object) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _num(value: float | None, fmt: str = ".3f", unit: str = "") -> str:
    if value is None or not math.isfinite(float(value)):
        return "&ndash;"
    return f"{float(value):{fmt}}{unit}"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, mime: str, alt: str, size: tuple[int, int] | None = None) -> str:
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{_data_uri(data, mime)}" alt="{_e(alt)}"{dims}>'


def _figure(body: str, caption: str) -> str:
    return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    """Two-column key/value table; values are HTML already escaped by the caller."""
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _picture(rgb: Any, alt: str, caption: str) -> str:
    """A figure of an RGB image embedded as JPEG (quality 90: the overlays' text stays
    sharp at a quarter of the PNG's size; the PNG files beside the report are lossless)."""
    from histohelper.client.render import encode_jpeg

    h, w = rgb.shape[:2]
    return _figure(_img(encode_jpeg(rgb, quality=90), "image/jpeg", alt, (w, h)), caption)


# --- sections ------------------------------------------------------------------------


def _untrained_text(result: SlideResult) -> str | None:
    if not result.model.untrained:
        return None
    return f"UNTRAINED: the model is {untrained_warning(result.model.untrained_parts)}."


def _prediction_section(result: SlideResult) -> str:
    p = result.prediction
    if p is None:
        text = "No tissue found" if result.outcome == "no_tissue" else "No slide prediction"
        return f'<div class="card prediction">{_e(text)} (outcome {_e(result.outcome)})</div>'
    u = p.uncertainty
    head = (
        f'<div class="prediction">Slide prediction: <b>{_e(p.predicted_class)}</b> '
        f"p = {_num(p.probability)}</div>"
    )
    if u is not None:
        head += (
            f"<p>MC dropout ({u.passes} passes): predictive entropy {_num(u.entropy_nats)} nats</p>"
        )
    header = "<tr><th>class</th><th>probability</th><th>logit</th>"
    header += "<th>MC mean ± std</th></tr>" if u is not None else "</tr>"
    body = ""
    for i, name in enumerate(p.class_names):
        mc = f"<td class='num'>{_num(u.mean[i])} ± {_num(u.std[i])}</td>" if u else ""
        body += (
            f"<tr><td>{_e(name)}</td><td class='num'>{_num(p.probabilities[i])}</td>"
            f"<td class='num'>{_num(p.logits[i])}</td>{mc}</tr>"
        )
    return f'<div class="card">{head}<table>{header}{body}</table></div>'


def _slide_section(result: SlideResult) -> str:
    from histohelper.client.render import encode_jpeg, encode_png

    t, s = result.thumbnail, result.slide
    thumb = result.thumbnail_rgb()
    mask = result.tissue_mask()
    mpp = "unknown" if s.mpp_x is None else f"{s.mpp_x:.4g} µm/px"
    thumb_fig = _figure(
        _img(encode_jpeg(thumb), "image/jpeg", "slide thumbnail", (t.width_px, t.height_px)),
        f"Thumbnail, {t.width_px} &times; {t.height_px} px (slide {s.width_l0} &times; "
        f"{s.height_l0} level-0 px, {_e(mpp)}, {_e(s.vendor or 'unknown vendor')})",
    )
    mask_fig = _figure(
        _img(encode_png(mask), "image/png", "tissue mask", (mask.shape[1], mask.shape[0])),
        f"Tissue mask (white: tissue), tissue fraction {_num(result.qc.tissue_fraction, '.1%')}",
    )
    return f'<h2>Slide</h2><div class="row">{thumb_fig}{mask_fig}</div>'


def _overlay_section(
    result: SlideResult,
    *,
    class_name: str | int | None,
    alpha: float,
    colormap: str,
    attention_scale: str,
) -> str:
    from histohelper.client.render import overlay

    figs = []
    if result.class_names:
        shown = result.default_class() if class_name is None else class_name
        idx = result.class_index(shown) if shown is not None else 0
        figs.append(
            _picture(
                overlay(result, class_name, alpha=alpha, colormap=colormap),
                "probability overlay",
                f"Patch probability of {_e(result.class_names[idx])} ({_e(colormap)})",
            )
        )
    if result.has_attention:
        scale = "percentile rank within the slide" if attention_scale == "rank" else "raw weight"
        figs.append(
            _picture(
                overlay(
                    result,
                    attention=True,
                    alpha=alpha,
                    colormap=colormap,
                    attention_scale=attention_scale,
                ),
                "attention overlay",
                f"MIL attention, {_e(scale)}",
            )
        )
    if not figs:
        return ""
    return f'<h2>Heatmaps</h2><div class="row">{"".join(figs)}</div>'


def _cam_section(
    result: SlideResult, cam_class: str | int | None, alpha: float, colormap: str
) -> str:
    if result.patches.cams is None or result.patches.logits is None or not len(result.patches):
        return ""
    from histohelper.client.render import overlay

    name = cam_class if cam_class is not None else result.default_class()
    if name is None:
        return ""
    idx = result.class_index(name)
    fig = _picture(
        overlay(result, name, cams=True, alpha=alpha, colormap=colormap),
        "CAM overlay",
        f"Sub-patch class activation map, P({_e(result.class_names[idx])}); the position "
        "pattern all patches share is removed",
    )
    return f'<h2>Class activation map</h2><div class="row">{fig}</div>'


def _top_patch_table(result: SlideResult, top_k: int) -> str:
    from histohelper.client.render import attention_rank

    p = result.patches
    if not len(p):
        return "<p>No patches.</p>"
    cls = result.class_index(result.default_class() or 0) if result.class_names else None
    if result.has_attention:
        scores, by = p.attention.astype(np.float64), "attention"
    elif cls is not None:
        scores, by = p.probabilities[:, cls].astype(np.float64), "probability"
    else:
        return ""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:top_k]
    ranks = attention_rank(p.attention) if result.has_attention else None
    head = "<tr><th>#</th><th>patch</th><th>row</th><th>col</th><th>x_l0</th><th>y_l0</th>"
    if ranks is not None:
        head += "<th>attention</th><th>percentile</th>"
    if cls is not None:
        head += f"<th>P({_e(result.class_names[cls])})</th>"
    rows = ""
    for k, i in enumerate(order):
        cells = (
            f"<td class='num'>{k + 1}</td><td class='num'>{int(p.patch_index[i])}</td>"
            f"<td class='num'>{int(p.row[i])}</td><td class='num'>{int(p.col[i])}</td>"
            f"<td class='num'>{_num(p.x_l0[i], '.0f')}</td>"
            f"<td class='num'>{_num(p.y_l0[i], '.0f')}</td>"
        )
        if ranks is not None:
            cells += (
                f"<td class='num'>{_num(p.attention[i], '.5f')}</td>"
                f"<td class='num'>{_num(100 * ranks[i], '.0f')}</td>"
            )
        if cls is not None:
            cells += f"<td class='num'>{_num(p.probabilities[i, cls])}</td>"
        rows += f"<tr>{cells}</tr>"
    return f"<p>Top {len(order)} patches by {by}.</p><table>{head}</tr>{rows}</table>"


def _gallery(explanations: Sequence[PatchExplanation], alpha: float, colormap: str) -> str:
    from histohelper.client.render import blend_cam, encode_jpeg

    figs = []
    for ex in explanations:
        image = ex.image_rgb()
        cam = blend_cam(image, ex.grad_cam_normalised(), alpha=alpha, colormap=colormap)
        size = (image.shape[1], image.shape[0])
        body = _img(encode_jpeg(image), "image/jpeg", f"patch {ex.patch_index}", size) + _img(
            encode_jpeg(cam), "image/jpeg", f"Grad-CAM of patch {ex.patch_index}", size
        )
        att = f", attention {_num(ex.attention, '.5f')}" if ex.attention is not None else ""
        caption = (
            f"#{ex.rank + 1} patch {ex.patch_index} (row {ex.row}, col {ex.col}): score "
            f"{_num(ex.score, '.4f')}{att}, P({_e(ex.class_name)}) "
            f"{_num(ex.class_probability)}"
        )
        figs.append(_figure(body, caption))
    stain = next((ex.stain for ex in explanations if ex.stain is not None), None)
    applied = f" Stain normalisation: {_e(stain.describe())}." if stain is not None else ""
    return (
        "<p>Each patch as the model saw it, beside its Grad-CAM (ResNet18 layer4, "
        f"normalised by its maximum).{applied}</p>"
        f'<div class="gallery">{"".join(figs)}</div>'
    )


def _qc_section(result: SlideResult) -> str:
    q, g = result.qc, result.grid
    warnings = (
        "<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in q.warnings) + "</ul>"
        if q.warnings
        else '<p class="ok">No QC warnings.</p>'
    )
    rows = [
        ("outcome", _e(result.outcome)),
        ("tissue fraction", _num(q.tissue_fraction, ".1%")),
        ("patches analysed", f"{result.patch_count} of {g.patch_count}"),
        ("patches that failed to read", str(q.failed_patch_count)),
        ("patches left out by the region of interest", str(q.roi_excluded_patch_count)),
        ("faint tissue (low contrast; check the mask)", "yes" if q.faint_tissue else "no"),
        *(
            (
                f"{_e(f.color.replace('_', '/'))} marker ink",
                f"{_num(f.slide_fraction, '.2%')} of the slide, "
                f"{f.inked_patch_count} patches &gt;25% inked",
            )
            for f in q.ink
        ),
        ("grid", f"{g.n_rows} rows &times; {g.n_cols} cols"),
        ("patch size / stride", f"{g.patch_size_px} / {g.stride_px} px"),
        ("effective resolution", f"{_num(g.effective_mpp, '.4g')} µm/px"),
        ("mpp source", _e(g.mpp_source)),
        ("pyramid level read", f"{g.level} (downsample {_num(g.level_downsample_x, '.4g')})"),
        ("edge mode", _e(g.edge_mode)),
        ("minimum tissue fraction", _num(g.min_tissue_fraction, ".2f")),
        ("stain normalisation", _e(result.stain.describe() if result.stain else "not reported")),
    ]
    return f"<h2>Quality control</h2>{warnings}{_table(rows)}"


def _model_section(result: SlideResult) -> str:
    m = result.model
    untrained = f"yes: {_e(describe_untrained(m.untrained_parts))}" if m.untrained else "no"
    rows = [
        ("name", _e(m.name)),
        ("version", _e(m.version)),
        ("engine", _e(m.engine or "unknown")),
        ("precision", _e(m.precision)),
        ("device", _e(m.device)),
        ("untrained", f'<span class="{"warn" if m.untrained else "ok"}">{untrained}</span>'),
        ("patch classes", _e(", ".join(m.patch_classes))),
        ("slide classes", _e(", ".join(m.slide_classes))),
        ("patch size", f"{m.patch_size_px} px at {_num(m.target_mpp, '.4g')} µm/px"),
    ]
    return f"<h2>Model</h2>{_table(rows)}"


def _timings_section(result: SlideResult) -> str:
    t = result.timings
    rows = [
        ("tiling", _num(t.tiling_s, ".2f", " s")),
        ("first result", _num(t.first_result_s, ".2f", " s")),
        ("inference", _num(t.inference_s, ".2f", " s")),
        ("aggregation (MIL)", _num(t.aggregate_s, ".2f", " s")),
        ("total (server)", _num(t.total_s, ".2f", " s")),
        ("throughput", _num(t.patches_per_s, ".1f", " patches/s")),
        ("client wall time", _num(result.wall_s, ".2f", " s")),
    ]
    return f"<h2>Timings</h2>{_table(rows)}"


def _page(title: str, body: str, csp: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main>{tail}</body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a hidden temporary beside ``path``, then rename it: a
    reader never sees half a page. Creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _footer(request_id: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<footer>HistoHelper {_e(__version__)} · request {_e(request_id)} · "
        f"written {_e(now)}. Research use only; not a diagnosis.</footer>"
    )


# --- public ----------------------------------------------------------------------------


def write_report(
    result: SlideResult,
    out_dir: StrPath,
    *,
    slide_name: str | None = None,
    explanations: Sequence[PatchExplanation] = (),
    cam_class: str | int | None = None,
    class_name: str | int | None = None,
    alpha: float = 0.5,
    colormap: str = styles.DEFAULT_COLORMAP,
    attention_scale: str = styles.DEFAULT_ATTENTION_SCALE,
    top_k: int = DEFAULT_TOP_K,
) -> Path:
    """Write ``report.html`` for one analysed slide into ``out_dir`` (created if missing).

    One self-contained file: images embedded as ``data:`` URIs (thumbnail, overlay
    figures and gallery as JPEG, the tissue mask as PNG), inline CSS, no script, and a
    Content Security Policy that forbids any fetch. Sections: slide prediction
    (probabilities, logits, MC dropout mean ± std and entropy when present), thumbnail
    and tissue mask, probability and attention overlays side by side, the sub-patch CAM
    map when the result carries CAMs, the top patches (a gallery of patch images beside
    their Grad-CAM when ``explanations`` are given, else a table of the top ``top_k`` by
    attention), quality control with its warnings, the model card and timings.

    Args:
        result: the analysed slide.
        out_dir: the folder (usually ``analyze``'s ``--out``).
        slide_name: shown in the title (user data: escaped; never logged).
        explanations: ranked ``ExplainPatches`` results for the gallery.
        cam_class: class of the CAM map (default: the overlay's class).
        class_name, alpha, colormap, attention_scale: as
            :func:`histohelper.client.render.overlay`.
        top_k: rows of the top-patch table.

    Returns:
        The path of ``report.html``.

    Raises:
        KeyError: unknown class.
        ValueError: unknown colour map or attention scale.
        OSError: the folder or file cannot be written.
    """
    styles.check_colormap(colormap)
    styles.check_attention_scale(attention_scale)
    name = slide_name or "slide"
    parts = [
        f"<h1>HistoHelper report: {_e(name)}</h1>",
        f'<p class="sub">request {_e(result.request_id)} · {result.patch_count} patches · '
        f"outcome {_e(result.outcome)}</p>",
    ]
    untrained = _untrained_text(result)
    if untrained:
        parts.append(f'<div class="banner">{_e(untrained)}</div>')
    if result.qc.warnings:
        parts.append(
            f'<p class="warn">{len(result.qc.warnings)} QC warning(s): see Quality control.</p>'
        )
    parts.append(_prediction_section(result))
    parts.append(_slide_section(result))
    parts.append(
        _overlay_section(
            result,
            class_name=class_name,
            alpha=alpha,
            colormap=colormap,
            attention_scale=attention_scale,
        )
    )
    parts.append(_cam_section(result, cam_class, alpha, colormap))
    parts.append("<h2>Top patches</h2>")
    parts.append(
        _gallery(explanations, alpha, colormap) if explanations else _top_patch_table(result, top_k)
    )
    parts += [_qc_section(result), _model_section(result), _timings_section(result)]
    parts.append(_footer(result.request_id))
    page = _page(f"HistoHelper report: {name}", "\n".join(p for p in parts if p), _CSP_REPORT)
    return _write_atomic(Path(out_dir) / REPORT_NAME, page)


def _relative_href(value: object) -> str | None:
    """A safe relative link (percent-encoded) or None: absolute paths, URLs with a
    scheme and ``..`` segments are shown as text, never linked."""
    text = str(value or "").strip().replace("\\", "/")
    if not text or text.startswith("/") or ":" in text.split("/")[0]:
        return None
    if ".." in PurePosixPath(text).parts:
        return None
    return quote(text, safe="/")


def _cell(key: str, value: object) -> str:
    if value is None:
        return "<td></td>"
    if key == "report":
        href = _relative_href(value)
        if href is None:
            return f"<td>{_e(value)}</td>"
        return f'<td><a href="{_e(href)}">report</a></td>'
    if isinstance(value, float):
        text = "" if not math.isfinite(value) else f"{value:.6g}"
        return f"<td class='num'>{_e(text)}</td>"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"<td class='num'>{value}</td>"
    text = str(value)
    try:
        float(text)
        css = " class='num'"
    except ValueError:
        css = " class='long'" if len(text) > 40 else ""
    return f"<td{css}>{_e(text)}</td>"


def _is_empty(value: object) -> bool:
    return value is None or str(value).strip() == ""


def write_cohort_index(
    out_dir: StrPath,
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
) -> Path:
    """Write ``index.html`` for a cohort into ``out_dir``: one row per slide, sortable.

    Columns: ``id``, ``status`` and ``report`` first (every row must have them), then
    the others in the order of ``columns`` (default: the rows' keys in order of first
    appearance); a column empty in every row is left out. ``report`` is a path relative to
    ``out_dir`` (``<slide id>/report.html``) and becomes a link; an absolute path, a URL
    or a path with ``..`` is shown as text instead. Clicking a column header sorts the
    rows by it (numerically when every non-empty cell is a number), again to reverse;
    the header carries ``aria-sort``. No fetch, no external script or style.

    Args:
        out_dir: the cohort's output folder (created if missing).
        rows: one mapping per slide (the cohort table's rows).
        columns: the order of the other columns (e.g. the cohort table's header).

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: a row lacks ``id``, ``status`` or ``report``.
        OSError: the file cannot be written.
    """
    order = ["id", "status", "report"]
    for k, row in enumerate(rows):
        missing = set(order) - set(row)
        if missing:
            raise ValueError(f"cohort row {k} lacks {', '.join(sorted(missing))}")
    for name in columns if columns is not None else [c for row in rows for c in row]:
        filled = any(not _is_empty(row.get(name)) for row in rows)
        if name not in order and filled:
            order.append(name)
    head = "".join(f'<th scope="col" title="click to sort">{_e(c)}</th>' for c in order)
    body = "".join("<tr>" + "".join(_cell(c, row.get(c)) for c in order) + "</tr>" for row in rows)
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row["status"])] = statuses.get(str(row["status"]), 0) + 1
    summary = ", ".join(f"{n} {_e(s)}" for s, n in sorted(statuses.items()))
    content = (
        f"<h1>HistoHelper cohort: {len(rows)} slides</h1>"
        f'<p class="sub">{summary or "no slides"} · click a column header to sort</p>'
        f'<table class="sortable" id="cohort"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
        f"<footer>HistoHelper {_e(__version__)}. Research use only; not a diagnosis.</footer>"
    )
    page = _page("HistoHelper cohort", content, _CSP_INDEX, _SORT_SCRIPT)
    return _write_atomic(Path(out_dir) / INDEX_NAME, page)

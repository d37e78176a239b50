"""``histohelper explain``: Grad-CAM gallery and sub-patch heatmap for one slide.

One analysis (with attention and CAMs) ranks the patches; one ``ExplainPatches`` call
returns the top k patch images with their layer4 Grad-CAM maps. Writes to ``--out``:

- ``gallery.png``: the top-k patches beside their Grad-CAM overlays, with scores;
- ``cam_overlay.png``: the sub-patch-resolution CAM probability map over the thumbnail
  (7 x 7 cells per 224 px patch, overlapping cells averaged);
- ``cam_heatmap.npz``: that map at one CAM cell per pixel (``heatmap``, ``l0_per_px``);
- ``explanations.json``: each explained patch's box, scores and Grad-CAM, and the stain
  normalisation applied to the patch images (``stain_normalization``, as ``summary.json``
  of ``analyze``);
- ``report.html``: the slide's report (:func:`histohelper.client.report.write_report`)
  with the gallery of patches beside their Grad-CAM and the CAM map.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from histohelper.client.cli import (
    _add_connection_arguments,
    _add_model_argument,
    _guarded,
    _make_client,
    _UsageError,
    add_overlay_arguments,
    add_roi_arguments,
    add_stain_arguments,
    patch_progress,
    region_of_interest,
)
from histohelper.model_parts import describe_untrained


def add_subcommands(subparsers: Any) -> None:
    """Register ``explain`` on the top-level parser."""
    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM gallery of the top patches and a sub-patch-resolution heatmap",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "slide",
        help="slide path relative to the server's slide root, or a PACS series "
        "dicomweb://NAME/STUDY_UID/SERIES_UID",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--top-k", type=int, default=8, help="patches in the gallery (default 8)")
    p.add_argument(
        "--by",
        choices=["attention", "probability"],
        default="attention",
        help="rank patches by MIL attention or by the class probability (default attention)",
    )
    p.add_argument(
        "--class",
        dest="class_name",
        help="patch class to explain (default: the model's last patch class)",
    )
    p.add_argument("--stride-px", type=int, help="patch stride at the target resolution")
    add_roi_arguments(p)
    add_stain_arguments(p)
    add_overlay_arguments(p)
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar or step lines on stderr"
    )
    _add_connection_arguments(p)
    _add_model_argument(p)
    p.set_defaults(func=_guarded("explain", _explain))


def step(args: argparse.Namespace, text: str) -> None:
    """One progress line on stderr (``explain: 1/3 ...``) unless ``--quiet``."""
    if not args.quiet:
        print(f"explain: {text}", file=sys.stderr, flush=True)


def _explained_stain(explanations: list[Any]) -> dict[str, Any] | None:
    """JSON of the stain normalisation the server applied to the explained images
    (one fit per call, so every explanation carries the same), or None if unreported."""
    stain = next((ex.stain for ex in explanations if ex.stain is not None), None)
    return None if stain is None else stain.as_dict()


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from histohelper.client.dicomweb import display_name
    from histohelper.client.explain import render_gallery
    from histohelper.client.options import AnalysisOptions
    from histohelper.client.render import cam_heatmap, overlay, write_png
    from histohelper.client.report import write_report

    if not 1 <= args.top_k <= 256:
        raise _UsageError("--top-k must be in 1..256")
    options = AnalysisOptions(
        return_attention=True,
        return_cams=True,
        stride_px=args.stride_px,
        roi=region_of_interest(args),
        stain_normalization=args.stain_normalization,
        stain_reference=args.stain_reference,
    )
    with _make_client(args) as client:
        classes = list(client.get_model_info(model=args.model).model.patch_classes)
        class_name: str | None = args.class_name or (classes[-1] if classes else None)
        if class_name is None or class_name not in classes:  # check before the analysis
            raise _UsageError(f"unknown class {class_name!r}; the model's classes: {classes}")
        step(args, "1/3 analysing the slide (attention and CAMs of every patch)")
        with patch_progress("explain", quiet=args.quiet) as on_progress:
            result = client.analyze(args.slide, options, on_progress=on_progress, model=args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        p = result.patches
        if len(p) == 0:
            print(f"{display_name(args.slide)}: no tissue patches to explain -> {args.out}")
            return 0
        cls = result.class_index(class_name)
        scores = p.attention if args.by == "attention" else p.probabilities[:, cls]
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[: args.top_k]
        indices = [int(p.patch_index[i]) for i in order]
        step(args, f"2/3 Grad-CAM of the top {len(indices)} patches by {args.by}")
        explanations = client.explain(
            args.slide,
            patch_indices=indices,
            class_name=class_name,
            options=options,
            model=args.model,
        )
    by_index = {int(p.patch_index[i]): i for i in order}
    ranked = [
        dataclasses.replace(
            ex,
            rank=rank,
            score=float(scores[by_index[ex.patch_index]]),
            attention=float(p.attention[by_index[ex.patch_index]]),
        )
        for rank, ex in enumerate(explanations)
    ]
    step(args, f"3/3 writing gallery, CAM overlay, explanations and report to {args.out}")
    write_png(args.out / "gallery.png", render_gallery(ranked, untrained=result.model.untrained))
    write_png(
        args.out / "cam_overlay.png",
        overlay(result, class_name, cams=True, colormap=args.colormap),
    )
    heat, l0_per_px = cam_heatmap(result, class_name)
    np.savez_compressed(
        args.out / "cam_heatmap.npz", heatmap=heat, l0_per_px=l0_per_px, class_name=class_name
    )
    records = [
        {
            "rank": ex.rank,
            "patch_index": ex.patch_index,
            "row": ex.row,
            "col": ex.col,
            "box_l0": [ex.x_l0, ex.y_l0, ex.width_l0, ex.height_l0],
            "ranked_by": args.by,
            "score": ex.score,
            "attention": ex.attention,
            "class_name": ex.class_name,
            "class_probability": ex.class_probability,
            "grad_cam": ex.grad_cam.tolist(),
        }
        for ex in ranked
    ]
    summary = {
        "class_name": class_name,
        "ranked_by": args.by,
        "untrained": result.model.untrained,
        "untrained_parts": list(result.model.untrained_parts),
        "stain_normalization": _explained_stain(ranked),
        "explanations": records,
    }
    (args.out / "explanations.json").write_text(json.dumps(summary, indent=2))
    write_report(
        result,
        args.out,
        slide_name=args.slide,
        explanations=ranked,
        cam_class=class_name,
        class_name=class_name,
        colormap=args.colormap,
        attention_scale=args.attention_scale,
    )
    flag = (
        f" [UNTRAINED: {describe_untrained(result.model.untrained_parts)}]"
        if result.model.untrained
        else ""
    )
    print(
        f"{display_name(args.slide)}: explained {len(ranked)} of {len(p)} patches by {args.by} "
        f"for class {class_name}{flag} -> {args.out}"
    )
    return 0

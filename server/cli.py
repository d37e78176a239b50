"""Server-side subcommands of the ``histohelper`` console script.

``add_subcommands`` registers each command through its own ``_add_*`` function;
heavy imports (OpenSlide, OpenCV) stay inside the run functions.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histohelper.server.tiling import Slide, TilingPlan
    from histohelper.server.tiling.roi import RegionOfInterest


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register the server's subcommands (``tile``; ``serve`` lives beside it)."""
    _add_tile(subparsers)


# --- tile -----------------------------------------------------------------------------


def _add_tile(subparsers: argparse._SubParsersAction) -> None:
    from histohelper.server.tiling.options import add_tiling_arguments

    p = subparsers.add_parser(
        "tile",
        help="tissue mask and patch grid of one slide (local, no model, no server)",
        description=(
            "Write tissue_mask.png, grid.png (thumbnail with the patch grid), patches.csv "
            "(patch_index, row, col, x_l0, y_l0, width_l0, height_l0, tissue_fraction, "
            "is_edge as histohelper analyze writes them, then ink_fraction) and summary.json; "
            "with --stain-normalization also stain_preview.png."
        ),
    )
    p.add_argument(
        "slide",
        help="slide file (any format OpenSlide reads, or a plain image); with --slide-root, "
        "a path relative to that root, as AnalyzeSlide takes it",
    )
    p.add_argument(
        "--slide-root",
        metavar="DIR",
        help="resolve SLIDE under DIR with the server's sandbox rules (relative path, no "
        "'..', nothing outside DIR through links)",
    )
    p.add_argument("--out", required=True, help="output directory (created)")
    add_tiling_arguments(p)
    model = p.add_argument_group(
        "model",
        "take the patch size and resolution from a model of a server's repository "
        "(GetModelInfo), so the grid is the one that model's analyses use",
    )
    model.add_argument(
        "--model",
        metavar="NAME[:VERSION]",
        help="model (and version) of the server's repository; its patch size and mpp "
        "replace --patch-size and the resolution flags ('' : the server's default model)",
    )
    model.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"server asked for --model (default ${_SERVER_ENV}); plaintext, with the "
        f"bearer token in ${_TOKEN_ENV} if set",
    )
    roi = p.add_argument_group(
        "region of interest",
        "preview the grid restricted to a region, as AnalyzeSlide applies it (grid.png "
        "draws the region's outline in red; level-0 px; README: Regions of interest)",
    )
    roi.add_argument("--roi", metavar="GEOJSON", help="include these annotations (QuPath export)")
    roi.add_argument("--roi-exclude", metavar="GEOJSON", help="leave these annotations out")
    roi.add_argument("--roi-mask", metavar="PNG", help="binary mask anchored at level-0 (0, 0)")
    roi.add_argument(
        "--roi-mask-downsample", type=float, default=0.0, metavar="D", help="level-0 px per mask px"
    )
    stain = p.add_argument_group(
        "stain normalisation preview",
        "fit a stain normalisation on the slide's tissue as AnalyzeSlide does and write "
        "stain_preview.png: a few patches, each as read beside its normalised version "
        "(README: Stain normalisation)",
    )
    stain.add_argument(
        "--stain-normalization",
        metavar="METHOD",
        help="macenko or reinhard (none, the default: no preview)",
    )
    stain.add_argument(
        "--stain-reference",
        metavar="published|IMAGE",
        default="published",
        help="the target: the published reference (default) or one fitted on an image "
        "file, as serve --stain-reference fits it (a model's or a server's reference is "
        "not known to tile)",
    )
    stain.add_argument(
        "--stain-previews",
        type=int,
        default=8,
        metavar="N",
        help="patches in stain_preview.png, spread over the kept grid (1..64, default 8)",
    )
    p.set_defaults(func=_run_tile)


_SERVER_ENV = "HISTOHELPER_SERVER"
_TOKEN_ENV = "HISTOHELPER_TOKEN"


def _use_model_geometry(args: argparse.Namespace) -> None:
    """Set ``args``' patch size and target mpp from ``GetModelInfo`` of ``--model``.

    Raises:
        InvalidOptionsError: no server, a resolution flag given too, or a malformed
            ``--model``.
        HistoHelperError: the call failed (MODEL_NOT_FOUND, unreachable server ...).
    """
    import os

    import grpc

    # The wire-to-error mapping of the client (grpc, protobuf and the core only): this
    # is a command line, not the service, which never imports the client.
    from histohelper.client.errors import error_from_rpc
    from histohelper.errors import InvalidOptionsError
    from histohelper.v1 import slide_analysis_pb2 as pb
    from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

    target = args.server or os.environ.get(_SERVER_ENV)
    if not target:
        raise InvalidOptionsError(f"--model needs --server HOST:PORT (or ${_SERVER_ENV})")
    if args.target_magnification is not None or args.target_level is not None:
        raise InvalidOptionsError("--model sets the resolution: leave out --magnification/--level")
    name, _, version = args.model.partition(":")
    token = os.environ.get(_TOKEN_ENV)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    request = pb.GetModelInfoRequest(model=pb.ModelRef(name=name, version=version))
    with grpc.insecure_channel(target) as channel:
        try:
            info = pb_grpc.SlideAnalysisServiceStub(channel).GetModelInfo(
                request, timeout=30, metadata=metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
    args.patch_size_px = info.model.patch_size_px
    args.target_mpp = info.model.target_mpp


def _run_tile(args: argparse.Namespace) -> int:
    import csv
    import json
    import sys
    from dataclasses import asdict, replace
    from pathlib import Path

    import cv2

    from histohelper.errors import HistoHelperError
    from histohelper.patch_csv import GEOMETRY_COLUMNS, format_fraction, geometry_cells
    from histohelper.server.sandbox import resolve_slide_path
    from histohelper.server.tiling import open_slide, plan_tiling, tiling_options_from_args
    from histohelper.server.tiling.render import grid_overlay, mask_image

    out = Path(args.out)
    if args.slide_root is not None and not Path(args.slide_root).is_dir():
        print(f"histohelper tile: no such slide root: {args.slide_root}", file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            _use_model_geometry(args)
        options = tiling_options_from_args(args)
        options = replace(options, roi=_region_from_files(args))
        slide_path = (
            Path(args.slide)
            if args.slide_root is None
            else resolve_slide_path(Path(args.slide_root), args.slide)
        )
        with open_slide(slide_path) as slide:
            plan = plan_tiling(slide, options)
            preview, stain_summary = _stain_preview(args, slide, plan)
    except HistoHelperError as exc:  # same form and exit status as `histohelper analyze`
        print(f"histohelper tile: error: {exc} [{exc.reason}]", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "tissue_mask.png"), mask_image(plan))
    cv2.imwrite(str(out / "grid.png"), cv2.cvtColor(grid_overlay(plan), cv2.COLOR_RGB2BGR))
    if preview is not None:
        cv2.imwrite(str(out / "stain_preview.png"), cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))
    g = plan.grid
    with open(out / "patches.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*GEOMETRY_COLUMNS, "ink_fraction"])  # analyze writes the same prefix
        for i in range(len(g)):
            geometry = geometry_cells(
                i, g.row[i], g.col[i], g.x_l0[i], g.y_l0[i], g.width_l0[i],
                g.height_l0[i], g.tissue_fraction[i], g.is_edge[i],
            )  # fmt: skip
            w.writerow([*geometry, format_fraction(g.ink_fraction[i])])
    md = plan.metadata
    summary = {
        "vendor": md.vendor,
        "level_dimensions": [list(d) for d in md.level_dimensions],
        "level_downsamples": [list(d) for d in md.level_downsamples],
        "mpp_x": plan.mpp_x,
        "mpp_y": plan.mpp_y,
        "mpp_source": plan.mpp_source,
        "objective_power": md.objective_power,
        "effective_mpp": plan.effective_mpp,
        "read_level": g.level,
        "read_size_px": [g.read_width_px, g.read_height_px],
        "patch_size_px": g.patch_size_px,
        "footprint_l0": [
            g.patch_size_px * g.stride_x_l0 / options.effective_stride_px,
            g.patch_size_px * g.stride_y_l0 / options.effective_stride_px,
        ],
        "stride_l0": [g.stride_x_l0, g.stride_y_l0],
        "grid_rows": g.n_rows,
        "grid_cols": g.n_cols,
        "patch_count": len(g),
        "edge_patch_count": int(g.is_edge.sum()),
        "tissue_fraction": plan.mask.tissue_fraction,
        "mask_method": plan.mask.method,
        "mask_threshold": plan.mask.threshold,
        "mask_shape": list(plan.mask.mask.shape),
        "mask_scale_l0": [plan.mask.scale_x, plan.mask.scale_y],
        "ink_fraction": plan.mask.ink_fraction,
        "ink": [asdict(f) for f in plan.ink],  # as summary.json of analyze writes it
        "faint_tissue": plan.faint_tissue,
        "no_tissue": plan.no_tissue,
        "roi_sha256": options.roi.sha256 if options.roi is not None else None,
        "roi_excluded_patch_count": plan.roi_excluded_patch_count,
        "stain_normalization": stain_summary,
        "warnings": list(plan.warnings),
        "tiling_seconds": plan.tiling_seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    roi_note = (
        f", {plan.roi_excluded_patch_count} left out by the region of interest"
        if options.roi is not None
        else ""
    )
    print(
        f"{len(g)} patches{roi_note}, tissue fraction {plan.mask.tissue_fraction:.3f}"
        f"{' (no tissue)' if plan.no_tissue else ''} -> {out}"
    )
    if stain_summary is not None and stain_summary.get("warning"):
        print(f"histohelper tile: warning: {stain_summary['warning']}", file=sys.stderr)
    return 0


def _stain_preview(args: argparse.Namespace, slide: Slide, plan: TilingPlan) -> tuple[Any, Any]:
    """The stain preview of ``tile``'s ``--stain-*`` flags: ``(sheet or None, summary)``.

    The normalisation is fitted on the plan's tissue pixels and applied to patches read
    as the analysis reads them (:func:`~histohelper.server.tiling.stain.fit_normalizer`,
    :func:`~histohelper.server.tiling.read_patch`), so the preview shows what
    AnalyzeSlide with the same method and published (or image) reference feeds the
    model. A fit that fails (too little tissue) is no error: no sheet, a warning.

    Returns:
        ``(None, None)`` without ``--stain-normalization`` (or ``none``); else the
        ``[h, w, 3]`` uint8 RGB sheet (None when the fit failed or no patch is kept)
        and the JSON summary (method, reference, fitted statistics, warning, patches).

    Raises:
        InvalidOptionsError: unknown method, ``--stain-previews`` outside 1..64, a
            ``model``/``server`` reference, an unreadable image or one with too little
            stained tissue.
    """
    import numpy as np

    from histohelper.errors import InvalidOptionsError
    from histohelper.server.tiling import read_patch
    from histohelper.server.tiling.render import preview_indices, stain_preview
    from histohelper.server.tiling.stain import (
        PUBLISHED,
        StainChoice,
        StainFitError,
        fit_normalizer,
        fit_reference_image,
        get_stain_method,
        read_reference_image,
    )

    method = (args.stain_normalization or "none").lower()
    if method == "none":
        return None, None
    get_stain_method(method)  # InvalidOptionsError for an unknown method
    if not 1 <= args.stain_previews <= 64:
        raise InvalidOptionsError("--stain-previews must be in 1..64")
    reference = args.stain_reference
    if reference in ("model", "server"):
        raise InvalidOptionsError(
            f"tile cannot preview the {reference} stain reference (it is not known "
            "locally): use published, or the image file the server or model was given"
        )
    if reference == "published":
        if method not in PUBLISHED:
            raise InvalidOptionsError(f"{method} has no published stain reference: give an image")
        target = PUBLISHED[method]
    else:
        try:
            target = fit_reference_image(method, read_reference_image(reference))
        except StainFitError as exc:
            raise InvalidOptionsError(f"--stain-reference image is unusable: {exc}") from None
        reference = "image"
    choice = StainChoice(method, reference, "request", target)
    normalizer, applied = fit_normalizer(choice, plan.tissue_rgb)
    indices = preview_indices(len(plan.grid), args.stain_previews)
    summary: dict[str, Any] = {
        "method": applied.method,
        "reference": reference,
        "fitted_stain_matrix": list(applied.fitted.stain_matrix),
        "fitted_max_concentrations": list(applied.fitted.max_concentrations),
        "fitted_means": list(applied.fitted.means),
        "fitted_stds": list(applied.fitted.stds),
        "warning": applied.warning,
        "preview_patch_indices": indices.tolist() if normalizer is not None else [],
    }
    if normalizer is None or not len(indices):
        return None, summary
    originals = np.stack([read_patch(slide, plan.grid, int(i)) for i in indices])
    title = f"{method} stain normalisation to the {reference} reference, fitted on the slide"
    return stain_preview(originals, normalizer(originals), indices, title), summary


def _region_from_files(args: argparse.Namespace) -> RegionOfInterest | None:
    """The region of interest of ``tile``'s ``--roi*`` flags (server default limits).

    Raises:
        InvalidOptionsError: as AnalyzeSlide refuses it; an unreadable file too.
    """
    from pathlib import Path

    from histohelper.errors import InvalidOptionsError
    from histohelper.server.tiling.roi import parse_region

    try:
        return parse_region(
            Path(args.roi).read_text(encoding="utf-8-sig") if args.roi else "",
            Path(args.roi_exclude).read_text(encoding="utf-8-sig") if args.roi_exclude else "",
            Path(args.roi_mask).read_bytes() if args.roi_mask else b"",
            args.roi_mask_downsample,
        )
    except OSError as exc:
        raise InvalidOptionsError(
            f"cannot read a region of interest file: {exc.strerror}"
        ) from None

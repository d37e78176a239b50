"""Client subcommands of the ``histohelper`` console script: ``analyze``, ``info``,
``evaluate``, ``features``.

``histohelper analyze SLIDE --server HOST:PORT --out DIR`` analyses a slide (path
relative to the server's slide root) with a progress bar, writes the standard files
and prints a one-line summary; with several slides, folders or a manifest CSV it runs a
resumable cohort (:mod:`histohelper.client.cohort`). ``histohelper info --server
HOST:PORT`` prints the served model's manifest. ``histohelper evaluate DIR --server
HOST:PORT`` scores the served model on a labelled patch folder
(:mod:`histohelper.client.evaluate`).
``histohelper features COHORT --server HOST:PORT --out DIR`` writes one HDF5 bag of patch
features per cohort slide (:mod:`histohelper.client.features`).

Expected failures (server errors, unreachable server, unwritable output) print one
line ``histohelper <command>: error: ...`` to stderr and exit non-zero, without a
traceback. Exit codes: 0 success, 1 a server or I/O error, 2 bad usage, 130
interrupted, 143 a cohort run stopped by SIGTERM.

The server address defaults to ``$HISTOHELPER_SERVER``; a bearer token is read from
the environment variable named by ``--token-env`` (default ``HISTOHELPER_TOKEN``), never
from the command line. Nothing is read at import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histohelper.cli import missing_extra_message
from histohelper.errors import HistoHelperError
from histohelper.model_parts import describe_untrained, untrained_warning

if TYPE_CHECKING:
    from histohelper.client.options import AnalysisOptions

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: A cohort run stopped by SIGTERM (128 + 15, as the shell reports a SIGTERM death).
EXIT_TERMINATED = 143

SERVER_ENV = "HISTOHELPER_SERVER"
TOKEN_ENV = "HISTOHELPER_TOKEN"


def add_subcommands(subparsers: Any) -> None:
    """Register ``analyze``, ``info``, ``evaluate`` and ``features`` (each with ``func``)."""
    _add_analyze(subparsers)
    _add_info(subparsers)
    _add_evaluate(subparsers)
    _add_features(subparsers)


def _add_analyze(subparsers: Any) -> None:
    analyze = subparsers.add_parser(
        "analyze",
        help="analyse a slide on a server; write overlay, heatmaps, GeoJSON, summary",
        description="Analyse a slide on a HistoHelper server and write overlay.png, "
        "attention_overlay.png, heatmap.npz, patches.csv, tiles.geojson and summary.json "
        "into --out. Several slides, FOLDERs or a manifest CSV make a resumable cohort run: "
        "--jobs slides in flight, DIR/<id>/ per slide, DIR/cohort.csv, DIR/run_manifest.json; "
        "a re-run skips finished slides; exit 1 when any slide failed.",
    )
    analyze.add_argument(
        "slide",
        metavar="SLIDE",
        nargs="+",
        help="slide path relative to the server's slide root, or a series on a PACS the "
        "server's operator configured: dicomweb://NAME/STUDY_UID/SERIES_UID; several "
        "slides, FOLDERs "
        "(slide files found by extension) or one manifest CSV make a cohort run "
        "(DIR/<id>/ per slide, DIR/cohort.csv, DIR/run_manifest.json; see "
        "histohelper.client.cohort)",
    )
    _add_connection_arguments(analyze)
    _add_model_argument(analyze, several=True)
    analyze.add_argument(
        "--out", "-o", type=Path, required=True, metavar="DIR", help="output directory"
    )
    _add_tiling_request_arguments(analyze)
    analyze.add_argument("--no-attention", action="store_true", help="do not request MIL attention")
    analyze.add_argument(
        "--mc-dropout-passes",
        type=int,
        default=0,
        metavar="N",
        help="Monte-Carlo dropout passes of the slide head for uncertainty (mean, std, "
        "entropy); needs a head exported with dropout; at most 256 (default: 0, off)",
    )
    add_stain_arguments(analyze)
    analyze.add_argument(
        "--class",
        dest="overlay_class",
        metavar="NAME",
        help="patch class shown in overlay.png (default: the predicted class)",
    )
    analyze.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1]")
    add_overlay_arguments(analyze)
    analyze.add_argument("--request-id", help="id echoed by the server and in its logs")
    analyze.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    analyze.add_argument(
        "--upload",
        action="store_true",
        help="SLIDE and FOLDER are local files, uploaded to the server before analysis",
    )
    analyze.add_argument(
        "--dicom-out",
        type=Path,
        metavar="DIR",
        help="for a slide read from DICOM (dicomweb://NAME/STUDY_UID/SERIES_UID or DICOM "
        "WSI files): write DICOM result objects into DIR (annotations.dcm: one polygon per "
        "patch with its probabilities and attention; probability_map_<k>.dcm: the heatmap "
        "of class k; slide_report.dcm: the slide prediction as a TID 1500 report); a "
        "cohort writes DIR/<id>/ per slide; needs the 'dicom' extra (highdicom)",
    )
    analyze.add_argument(
        "--stow",
        action="store_true",
        help="send the DICOM result objects back to the PACS the dicomweb:// slide came "
        "from (StoreDicom; the server stores them with the operator's credentials; needs "
        "the 'store' role where tokens are configured)",
    )
    analyze.add_argument(
        "--slide-root",
        type=Path,
        metavar="DIR",
        help="local view of the server's slide root, where FOLDER arguments are looked up "
        "(default: the current directory)",
    )
    analyze.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=4,
        metavar="K",
        help="cohort: slides in flight (default 4; fewer while servers answer SERVER_BUSY)",
    )
    analyze.set_defaults(func=run_analyze)


def add_stain_arguments(parser: argparse.ArgumentParser) -> None:
    """``--stain-normalization`` and ``--stain-reference`` (``analyze``, ``explain``)."""
    parser.add_argument(
        "--stain-normalization",
        choices=("none", "macenko", "reinhard"),
        help="stain normalisation of the patches, fitted once per slide on its tissue "
        "(default: what the model declares it was trained with, else none)",
    )
    parser.add_argument(
        "--stain-reference",
        choices=("published", "model", "server"),
        help="its target: the published H&E reference, the model's (export "
        "--stain-reference) or the server's (serve --stain-reference) (default: the "
        "server's, else the model's, else published; not with --stain-normalization none)",
    )


def add_overlay_arguments(parser: argparse.ArgumentParser) -> None:
    """``--colormap`` and ``--attention-scale``: how the overlay figures are drawn."""
    from histohelper.client.styles import (
        ATTENTION_SCALES,
        COLORMAP_NAMES,
        DEFAULT_ATTENTION_SCALE,
        DEFAULT_COLORMAP,
    )

    parser.add_argument(
        "--colormap",
        choices=COLORMAP_NAMES,
        default=DEFAULT_COLORMAP,
        help="colour map of the overlays (default %(default)s; viridis and magma are "
        "perceptually uniform and readable by colour-blind readers)",
    )
    parser.add_argument(
        "--attention-scale",
        choices=ATTENTION_SCALES,
        default=DEFAULT_ATTENTION_SCALE,
        help="attention overlay: each patch's percentile rank within the slide (default "
        "rank) or the raw attention weight on 0..max (raw)",
    )


def _add_info(subparsers: Any) -> None:
    info = subparsers.add_parser(
        "info",
        help="print the served model's manifest and the server's model repository",
        description="Print the served model's summary and manifest (--model: that model of "
        "the server's repository), and every version of the repository with its state.",
    )
    _add_connection_arguments(info)
    _add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)


def _add_evaluate(subparsers: Any) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="patch-level metrics of the served model on a labelled patch folder",
        description="Classify every patch of DIR (ImageFolder layout: DIR/<class>/<images>; "
        "PNG, JPEG or TIFF of any size) on the server and print the confusion matrix, "
        "accuracy, sensitivity, specificity, precision (PPV), NPV, F1 and ROC AUC with 95 %% "
        "confidence intervals: Clopper-Pearson exact binomial for the proportions, percentile "
        "bootstrap for F1 and ROC AUC. Needs scikit-learn (pip install "
        "'histohelper[evaluate]').",
    )
    evaluate.add_argument("folder", metavar="DIR", type=Path, help="labelled patch folder")
    _add_connection_arguments(evaluate)
    _add_model_argument(evaluate)
    evaluate.add_argument(
        "--positive", metavar="CLASS", help="positive class (default: the model's last class)"
    )
    evaluate.add_argument("--out", "-o", type=Path, metavar="FILE", help="write the report as JSON")
    evaluate.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per request (default 32)"
    )
    evaluate.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the F1 and ROC AUC intervals (default 1000)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    grouping = evaluate.add_mutually_exclusive_group()
    grouping.add_argument(
        "--group-by",
        choices=("patch", "subfolder"),
        default="patch",
        help="unit of the intervals: each patch (default), or the first folder below the "
        "class folder (DIR/<class>/<slide or patient>/...): whole groups are resampled and "
        "proportions use the groups' effective sample size, since patches of one slide "
        "are correlated",
    )
    grouping.add_argument(
        "--group-regex",
        metavar="REGEX",
        help="unit of the intervals: the first capture group (else the match) of REGEX searched "
        r"in each path below the class folder, e.g. '(TCGA-\w\w-\w{4})'",
    )
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=run_evaluate)


def _add_features(subparsers: Any) -> None:
    features = subparsers.add_parser(
        "features",
        help="write one HDF5 bag of patch features per cohort slide (for MIL training)",
        description="For every slide of COHORT (CSV: column slide, a path relative to the "
        "server's slide root; optional label, patient, split) run one analysis with "
        "embeddings and write DIR/<stem>-<hash>.h5 with datasets features float32 [N, D] and "
        "coords int64 [N, 2] (level-0 x, y of each patch's top-left corner), plus "
        "features_index.csv. Slides already written with the same model and options are "
        "skipped; files of another model make the command refuse (exit 2) unless "
        "--overwrite. Exit 1 when any slide failed. Needs h5py "
        "(the 'features' extra; README: Install).",
    )
    features.add_argument("cohort", metavar="COHORT", type=Path, help="cohort CSV")
    _add_connection_arguments(features)
    features.add_argument(
        "--out", "-o", type=Path, required=True, metavar="DIR", help="output directory"
    )
    features.add_argument(
        "--jobs", "-j", type=int, default=2, metavar="K", help="slides in flight (default 2)"
    )
    features.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every slide, replacing files (also those of another model)",
    )
    _add_tiling_request_arguments(features)
    features.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    features.set_defaults(func=run_features)


def _add_tiling_request_arguments(p: argparse.ArgumentParser) -> None:
    """The analysis options a request carries (resolution, patch, stride, tissue, edge,
    batch, mpp override), shared by ``analyze`` and ``features``."""
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=float, help="patch resolution in um/px (default: the model's)")
    res.add_argument("--magnification", type=float, help="patch resolution as objective power")
    res.add_argument("--level", type=int, help="read this pyramid level at face value")
    p.add_argument("--patch-size", type=int, metavar="PX", help="patch side in px")
    p.add_argument("--stride", type=int, metavar="PX", help="step between patches in px")
    p.add_argument(
        "--min-tissue", type=float, metavar="FRACTION", help="min tissue fraction of a patch"
    )
    p.add_argument("--edge-mode", choices=("pad", "drop"), help="patches past the edge")
    p.add_argument("--batch-size", type=int, help="patches per model batch on the server")
    p.add_argument("--mpp-override", type=float, help="level-0 um/px to use instead")
    add_roi_arguments(p)


def add_roi_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--roi*`` flags (read by :func:`region_of_interest`)."""
    roi = p.add_argument_group(
        "region of interest",
        "analyse only patches whose tissue fraction inside the region passes --min-tissue "
        "(coordinates in level-0 px; README: Regions of interest)",
    )
    roi.add_argument(
        "--roi",
        type=Path,
        metavar="GEOJSON",
        help="include these annotations (QuPath: File > Export objects as GeoJSON; Polygon "
        "and MultiPolygon, holes honoured)",
    )
    roi.add_argument("--roi-exclude", type=Path, metavar="GEOJSON", help="leave these out")
    roi.add_argument(
        "--roi-mask",
        type=Path,
        metavar="PNG",
        help="binary mask (nonzero = inside) anchored at level-0 (0, 0)",
    )
    roi.add_argument(
        "--roi-mask-downsample",
        type=float,
        metavar="D",
        help="level-0 px per --roi-mask px",
    )


def _request_options(args: argparse.Namespace, **extra: Any) -> AnalysisOptions:
    """The request options of :func:`_add_tiling_request_arguments`'s flags, plus
    ``extra`` fields."""
    from histohelper.client.options import AnalysisOptions

    return AnalysisOptions(
        target_mpp=args.mpp,
        target_magnification=args.magnification,
        target_level=args.level,
        patch_size_px=args.patch_size,
        stride_px=args.stride,
        min_tissue_fraction=args.min_tissue,
        edge_mode=args.edge_mode,
        batch_size=args.batch_size,
        mpp_override=args.mpp_override,
        roi=region_of_interest(args),
        **extra,
    )


def region_of_interest(args: argparse.Namespace) -> Any:
    """The :class:`~histohelper.client.roi.RegionOfInterest` of the ``--roi*`` flags, or
    None. Raises OSError for an unreadable file, _UsageError for a lone downsample."""
    from histohelper.client.roi import RegionOfInterest

    if args.roi is None and args.roi_exclude is None and args.roi_mask is None:
        if args.roi_mask_downsample is not None:
            raise _UsageError("--roi-mask-downsample needs --roi-mask")
        return None
    if args.roi_mask is not None and args.roi_mask_downsample is None:
        raise _UsageError("--roi-mask needs --roi-mask-downsample (level-0 px per mask px)")
    return RegionOfInterest.from_files(
        args.roi, args.roi_exclude, args.roi_mask, args.roi_mask_downsample or 0.0
    )


def _add_model_argument(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    from histohelper.client.models import add_model_argument

    add_model_argument(parser, several=several)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"server address (default: ${SERVER_ENV}); several, comma-separated IP:PORT "
        "addresses or a dns:///NAME:PORT target spread the calls (round_robin)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="deadline of the call (default: none)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="attempts of a call on UNAVAILABLE, with backoff, 1..5 (default 5); for "
        "analyze (one slide or many) and features also the attempts per slide on "
        "SERVER_BUSY, UNAVAILABLE, MODEL_IN_USE or PACS_UNAVAILABLE: retry n waits "
        "min(32, 4*2^(n-1)) s plus full jitter up to min(32, 2^(n-1)) s, and at least the "
        "server's retry_after_s, so the default 5 attempts span 60-75 s (a server restart)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    parser.add_argument("--ca", type=Path, metavar="PEM", help="root certificates (implies TLS)")
    parser.add_argument("--cert", type=Path, metavar="PEM", help="client certificate chain")
    parser.add_argument("--key", type=Path, metavar="PEM", help="client private key")
    parser.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding a bearer token (default {TOKEN_ENV})",
    )


class _UsageError(Exception):
    """A bad combination of arguments found after parsing."""


def _make_client(args: argparse.Namespace) -> Any:
    from histohelper.client.sync import SlideClient

    target, kwargs = _client_arguments(args)
    return SlideClient(target, **kwargs)


def _client_arguments(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Target and keyword arguments of a (sync or aio) client from the connection flags."""
    from histohelper.client._channel import RetryPolicy, resolve_target

    target = args.server or os.environ.get(SERVER_ENV)
    if not target:
        raise _UsageError(f"no server: pass --server HOST:PORT or set {SERVER_ENV}")
    try:
        resolve_target(target)
    except ValueError as exc:
        raise _UsageError(f"--server: {exc}") from None
    if not 1 <= args.retries <= 5:
        raise _UsageError("--retries must be in 1..5")
    if (args.cert is None) != (args.key is None):
        raise _UsageError("--cert and --key go together")
    retry = RetryPolicy(max_attempts=args.retries) if args.retries > 1 else None
    ca = args.ca.read_bytes() if args.ca else None
    cert = args.cert.read_bytes() if args.cert else None
    key = args.key.read_bytes() if args.key else None
    use_tls = True if (args.tls or ca or cert or key) else None
    return target, {
        "tls": use_tls,
        "token": os.environ.get(args.token_env) or None,
        "timeout": args.timeout,
        "retry": retry,
        "root_certificates": ca,
        "certificate_chain": cert,
        "private_key": key,
    }


def _guarded(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Run ``body``; turn expected failures into one stderr line and an exit code."""

    def run(args: argparse.Namespace) -> int:
        def fail(message: str, code: int) -> int:
            print(f"histohelper {command}: error: {message}", file=sys.stderr)
            return code

        try:
            return body(args)
        except HistoHelperError as exc:
            detail = f"{exc.message} [{exc.reason}]"
            request_id = exc.metadata.get("request_id")
            if request_id:
                detail += f" (request id {request_id})"
            return fail(detail, EXIT_ERROR)
        except _UsageError as exc:
            return fail(str(exc), EXIT_USAGE)
        except BrokenPipeError:  # stdout's reader left (| head): histohelper.cli ends quietly
            raise
        except OSError as exc:
            return fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_ERROR)
        except KeyboardInterrupt:
            return fail("interrupted", EXIT_INTERRUPTED)

    return run


@contextlib.contextmanager
def patch_progress(desc: str, quiet: bool = False) -> Iterator[Callable[[Any], None]]:
    """A tqdm bar on stderr for one analysis; yields the ``on_progress`` callback that
    ``SlideClient.analyze`` calls with each progress event (patches done of total).

    Args:
        desc: the bar's label (the command's name).
        quiet: no bar at all; otherwise tqdm draws it only where stderr is a terminal
            (``disable=None``), so logs and pipes stay clean.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=None,
        unit="patch",
        desc=desc,
        disable=True if quiet else None,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def on_progress(p: Any) -> None:
        if bar.total != p.patches_total:
            bar.total = p.patches_total
        bar.update(p.patches_done - bar.n)

    try:
        yield on_progress
    finally:
        bar.close()


def _analyze_one(
    client: Any,
    item: Any,
    options: AnalysisOptions,
    attempts: int,
    on_progress: Callable[[Any], None],
) -> Any:
    """One slide through the cohort runner's retry policy: ``SlideClient.analyze_many``
    with this one slide (:mod:`histohelper.client.cohort`: SERVER_BUSY, UNAVAILABLE and
    PACS_UNAVAILABLE retried, ``attempts`` in all, with backoff and after at least the
    server's ``retry_after_s``), each retry announced on stderr by the cohort's line
    (:func:`~histohelper.client.cohort_runner.retry_line`, no slide name).

    Args:
        client: a :class:`~histohelper.client.sync.SlideClient`.
        item: the slide, a :class:`~histohelper.client.cohort.CohortSlide`.
        options: its analysis options.
        attempts: calls at most (``--retries``), >= 1.
        on_progress: called with each progress report (``patches_done`` of
            ``patches_total``), on the cohort runner's thread.

    Returns:
        The slide's :class:`~histohelper.client.result.SlideResult`.

    Raises:
        HistoHelperError, OSError: the last attempt's error.
    """
    from tqdm import tqdm

    from histohelper.client.cohort_runner import retry_line

    def report(event: Any) -> None:
        if event.kind == "patches":
            on_progress(event)
        elif event.kind == "retry":
            tqdm.write(retry_line(event, attempts), file=sys.stderr)

    (outcome,) = client.analyze_many(
        [item], options, jobs=1, retries=attempts - 1, on_progress=report
    )
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def _analyze(args: argparse.Namespace) -> int:

    if not 0.0 <= args.alpha <= 1.0:
        raise _UsageError("--alpha must be in [0, 1]")
    options = _request_options(
        args,
        return_attention=not args.no_attention,
        mc_dropout_passes=args.mc_dropout_passes,
        stain_normalization=args.stain_normalization,
        stain_reference=args.stain_reference,
    )
    if args.jobs < 1:
        raise _UsageError("--jobs must be >= 1")
    from histohelper.client.cohort import CohortSlide
    from histohelper.client.cohort_runner import is_manifest, local_folder
    from histohelper.client.dicomweb import display_name, is_dicomweb_uri

    slide_root = args.slide_root or Path.cwd()
    first = args.slide[0]
    models: list[str] = args.model or []
    model = models[0] if models else None
    wants_dicom = args.dicom_out is not None or args.stow
    if wants_dicom:
        _check_dicom_extra()
    several = len(args.slide) > 1 or len(models) > 1
    if several or is_manifest(first) or local_folder(first, slide_root, args.upload):
        return _analyze_cohort(args, options, slide_root)
    if args.stow:
        _check_stow([first])
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)  # fail before the analysis, not after
    if args.dicom_out is not None:
        args.dicom_out.mkdir(parents=True, exist_ok=True)
    with _make_client(args) as client:
        if args.overlay_class is not None:  # check before spending the analysis
            classes = client.get_model_info(model=model).model.patch_classes
            if args.overlay_class not in classes:
                raise _UsageError(
                    f"--class {args.overlay_class!r} is not a patch class; "
                    f"classes: {', '.join(classes)}"
                )
        with patch_progress("analyze", quiet=args.quiet) as on_progress:
            upload = args.upload and not is_dicomweb_uri(first)
            item = CohortSlide(first, upload=upload, model=model, request_id=args.request_id)
            result = _analyze_one(client, item, options, args.retries, on_progress)
    from histohelper.client.cohort_runner import write_analysis_files

    shown = display_name(first)  # report.html's title: a DICOMweb series by its safe id
    write_analysis_files(result, out_dir, {**_render_settings(args), "slide_name": shown})
    print(summary_line(display_name(first), result, out_dir))
    for line in qc_warning_lines(result):
        print(line)
    if wants_dicom:
        _dicom_outputs(args, result)
    return EXIT_OK


def _check_dicom_extra() -> None:
    """Refuse ``--dicom-out`` / ``--stow`` before any analysis without highdicom."""
    import importlib.util

    if importlib.util.find_spec("highdicom") is None:
        raise _UsageError(
            "--dicom-out and --stow need the Python package 'highdicom', which the plain "
            "install leaves out: install the 'dicom' extra, e.g. pip install "
            "'histohelper[dicom] @ git+<repository URL>' (not on PyPI; README: Install)"
        )


def _check_stow(slides: list[str]) -> None:
    """Refuse ``--stow`` before any analysis when a slide is not a ``dicomweb://`` series
    (there would be no PACS to send its results back to)."""
    from histohelper.client.dicomweb import is_dicomweb_uri

    if not all(is_dicomweb_uri(s) for s in slides):
        raise _UsageError(
            "--stow sends the results back to the PACS each slide came from: give every "
            "slide as dicomweb://NAME/STUDY_UID/SERIES_UID"
        )


def _dicom_outputs(args: argparse.Namespace, result: Any) -> None:
    """Write (``--dicom-out``) and/or store (``--stow``) the DICOM result objects; one
    line each on stdout (file names and sizes, SOP Instance UIDs never printed).

    Raises:
        _UsageError: the slide was not read from DICOM, or it has no patches.
    """
    from histohelper.client.dicom_results import export_dicom

    if result.dicom is None:
        raise _UsageError(
            "the slide was not read from DICOM, so there is nothing DICOM objects can "
            "reference: --dicom-out and --stow need a dicomweb://NAME/STUDY_UID/SERIES_UID "
            f"series or DICOM WSI files (the other files are in {args.out})"
        )
    if result.patch_count == 0:
        print(f"DICOM: no patches ({result.outcome}), no DICOM result objects written")
        return
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(_make_client(args)).store_dicom if args.stow else None
        try:
            paths, stored = export_dicom(result, args.dicom_out, store=store)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
    if paths:
        total = sum(p.stat().st_size for p in paths)
        print(f"DICOM: {len(paths)} objects ({total / 1e6:.2f} MB) -> {args.dicom_out}")
    if stored is not None:
        print(
            f"DICOM: stored {len(stored.sop_instance_uids)} objects on the PACS "
            f"{stored.dicomweb_server!r} (study of the source slide)"
        )


def _render_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``save_all`` keyword arguments from the overlay flags (one-slide and cohort runs)."""
    return {
        "class_name": args.overlay_class,
        "alpha": args.alpha,
        "colormap": args.colormap,
        "attention_scale": args.attention_scale,
    }


def _analyze_cohort(args: argparse.Namespace, options: AnalysisOptions, slide_root: Path) -> int:
    """``analyze`` with many slides, folders or a manifest (:mod:`histohelper.client.cohort`)."""
    import asyncio

    from histohelper.client.cohort_runner import (
        DICOM_KEY,
        assign_ids,
        is_manifest,
        run_cohort,
        slides_from_arguments,
        slides_from_manifest,
        with_models,
    )
    from histohelper.client.dicomweb import display_name
    from histohelper.cohort_csv import CohortError

    if args.request_id is not None:
        raise _UsageError("--request-id names one call; leave it out for a cohort run")
    manifests = [a for a in args.slide if is_manifest(a)]
    try:
        if manifests and len(args.slide) > 1:
            raise CohortError("a manifest CSV must be the only SLIDE argument")
        if manifests:
            items = slides_from_manifest(manifests[0], options, upload=args.upload)
        else:
            items = slides_from_arguments(args.slide, slide_root=slide_root, upload=args.upload)
        items = with_models(assign_ids(items), args.model or [])
    except CohortError as exc:
        raise _UsageError(str(exc)) from None
    args.out.mkdir(parents=True, exist_ok=True)  # fail before the analyses, not after
    render = _render_settings(args)
    if args.dicom_out is not None or args.stow:  # DIR/<id>/*.dcm and/or STOW per slide
        if args.stow:
            _check_stow([str(item.slide) for item in items])
        if args.dicom_out is not None:
            args.dicom_out.mkdir(parents=True, exist_ok=True)
        out = None if args.dicom_out is None else str(args.dicom_out)
        render[DICOM_KEY] = {"out": out, "stow": bool(args.stow)}
    target, kwargs = _client_arguments(args)

    terminated: list[bool] = []

    async def main() -> Any:
        from histohelper.client.aio import AsyncSlideClient

        task = asyncio.current_task()

        def on_sigterm() -> None:  # cancels the run as SIGINT does (files kept)
            terminated.append(True)
            if task is not None:
                task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        async with AsyncSlideClient(target, **kwargs) as client:
            if args.overlay_class is not None:  # check before spending the analyses
                first = (args.model or [None])[0]
                classes = (await client.get_model_info(model=first)).model.patch_classes
                if args.overlay_class not in classes:
                    raise _UsageError(
                        f"--class {args.overlay_class!r} is not a patch class; "
                        f"classes: {', '.join(classes)}"
                    )
            return await run_cohort(
                client,
                items,
                args.out,
                base_options=options,
                render=render,
                jobs=args.jobs,
                retries=args.retries - 1,
                quiet=args.quiet,
            )

    try:
        run = asyncio.run(main())
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("histohelper analyze: error: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    counts = {s: sum(r["status"] == s for r in run.rows) for s in ("done", "skipped", "no_tissue")}
    print(
        f"cohort: {counts['done']} done, {counts['skipped']} skipped, {counts['no_tissue']} "
        f"without tissue, {len(run.failed)} failed of {len(run.rows)} slides -> {args.out}"
    )
    if run.failed:
        print(f"histohelper analyze: {len(run.failed)} slide(s) failed:", file=sys.stderr)
        for r in run.failed:
            print(f"  {r['id']} ({display_name(r['slide'])}): {r['error']}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def summary_line(slide: str, result: Any, out_dir: Path) -> str:
    """One line: prediction, patch count, tissue fraction, model, time, output dir."""
    if result.prediction is None:
        verdict = "no tissue found" if result.outcome == "no_tissue" else "no prediction"
    else:
        p = result.prediction
        verdict = f"predicted {p.predicted_class} (p={p.probability:.3f})"
        if p.uncertainty is not None:
            verdict += f"; {p.uncertainty_text()}"
    model = f"{result.model.name} {result.model.version}".strip()
    if result.model.untrained:
        model += f" [UNTRAINED: {describe_untrained(result.model.untrained_parts)}]"
    t = result.timings
    speed = "cached" if getattr(result, "cached", False) else f"{t.patches_per_s:.1f} patches/s"
    return (
        f"{slide}: {verdict} | {result.patch_count} patches | "
        f"tissue {result.qc.tissue_fraction:.1%} | model {model} | "
        f"{t.total_s:.1f} s ({speed}) -> {out_dir}"
    )


def qc_warning_lines(result: Any) -> list[str]:
    """One console line per QC warning of the result (marker ink, slide smaller than a
    patch, assumed mpp, ...), in the server's order; [] when there are none. The same
    texts are ``summary.json``'s ``warnings``."""
    return [f"  QC warning: {w}" for w in result.qc.warnings]


def _info(args: argparse.Namespace) -> int:
    with _make_client(args) as client:
        info = client.get_model_info(model=args.model)
    m = info.model
    try:
        manifest: Any = info.manifest
    except json.JSONDecodeError:
        manifest = info.manifest_json
    if args.json:
        doc = {
            "model": {
                "name": m.name,
                "version": m.version,
                "patch_classes": list(m.patch_classes),
                "slide_classes": list(m.slide_classes),
                "untrained": m.untrained,
                "untrained_parts": list(m.untrained_parts),
                "precision": m.precision,
                "device": m.device,
                "engine": m.engine,
                "patch_size_px": m.patch_size_px,
                "target_mpp": m.target_mpp,
                "embedding_dim": m.embedding_dim,
            },
            "default_batch_size": info.default_batch_size,
            "max_concurrent_analyses": info.max_concurrent_analyses,
            "manifest": manifest,
            "repository": [
                {
                    "name": r.model.name,
                    "version": r.model.version,
                    "state": r.state,
                    "default_version": r.default_version,
                    "default_model": r.default_model,
                    "error": r.error,
                    "artifact_sha256": r.model.artifact_sha256,
                }
                for r in info.models
            ],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    lines = [
        f"model: {m.name} {m.version} ({m.precision} on {m.device}"
        + (f", {m.engine})" if m.engine else ")"),
        f"patch: {m.patch_size_px} px at {m.target_mpp:g} um/px; embedding dim {m.embedding_dim}",
        f"patch classes: {', '.join(m.patch_classes)}",
        f"slide classes: {', '.join(m.slide_classes)}",
        f"server defaults: batch size {info.default_batch_size}, "
        f"max concurrent analyses {info.max_concurrent_analyses}",
    ]
    if m.untrained:
        lines.append(f"WARNING: {untrained_warning(m.untrained_parts)}")
    if info.models:
        from histohelper.client.models import format_listing

        lines.append("repository (model, version, state):")
        lines.extend("  " + line for line in format_listing(info.models).splitlines())
    lines.append("manifest:")
    lines.append(json.dumps(manifest, indent=2) if not isinstance(manifest, str) else manifest)
    print("\n".join(lines))
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise _UsageError(missing_extra_message("evaluate", "sklearn"))
    if not 1 <= args.batch_size <= 1024:
        raise _UsageError("--batch-size must be in [1, 1024]")
    if args.bootstrap < 0:
        raise _UsageError("--bootstrap must be >= 0")
    group_by: str | re.Pattern[str] = args.group_by
    if args.group_regex is not None:
        try:
            group_by = re.compile(args.group_regex)
        except re.error as exc:
            raise _UsageError(f"--group-regex is not a regular expression: {exc}") from None
    from tqdm import tqdm

    from histohelper.client.evaluate import (
        EvaluationError,
        evaluate_folder,
        patch_groups,
        scan_patch_folder,
    )

    try:
        folder = scan_patch_folder(args.folder)
        patch_groups(folder, group_by)  # fail before any image is sent
    except EvaluationError as exc:
        raise _UsageError(str(exc)) from None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # fail before the work, not after
    with _make_client(args) as client:
        bar = tqdm(
            total=len(folder.patches),
            unit="patch",
            desc="evaluate",
            disable=True if args.quiet else None,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            report = evaluate_folder(
                client,
                folder,
                positive=args.positive,
                batch_size=args.batch_size,
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                on_progress=lambda done, _total: bar.update(done - bar.n),
                group_by=group_by,
                model=args.model,
            )
        except EvaluationError as exc:
            raise _UsageError(str(exc)) from None
        finally:
            bar.close()
    print(report.format_table())
    if args.out is not None:
        args.out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report -> {args.out}")
    return EXIT_OK


def _features(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("h5py") is None:
        raise _UsageError(missing_extra_message("features", "h5py"))
    if args.jobs < 1:
        raise _UsageError("--jobs must be >= 1")
    from histohelper.client.features import CohortError, read_cohort

    try:
        rows = read_cohort(args.cohort)
    except CohortError as exc:
        raise _UsageError(f"{args.cohort}: {exc}") from None
    options = _request_options(args)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)  # fail before the analyses, not after
    target, kwargs = _client_arguments(args)
    import asyncio

    outcomes = asyncio.run(_features_async(args, rows, options, out_dir, target, kwargs))
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("written", "skipped", "no_tissue")}
    print(
        f"features: {counts['written']} written, {counts['skipped']} skipped, "
        f"{counts['no_tissue']} without tissue, {len(failed)} failed of {len(outcomes)} "
        f"slides -> {out_dir}"
    )
    if failed:
        print(f"histohelper features: {len(failed)} slide(s) failed:", file=sys.stderr)
        for o in failed:
            print(f"  {o.slide}: {o.reason}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


async def _features_async(
    args: argparse.Namespace,
    rows: list[Any],
    options: Any,
    out_dir: Path,
    target: str,
    kwargs: dict[str, Any],
) -> list[Any]:
    import time

    from tqdm import tqdm

    from histohelper.client.aio import AsyncSlideClient
    from histohelper.client.features import (
        ModelIdentity,
        SlideOutcome,
        extract_features,
        feature_file_name,
        find_foreign_files,
        write_index,
    )

    async with AsyncSlideClient(target, **kwargs) as client:
        model = ModelIdentity.from_info(await client.get_model_info())
        foreign = find_foreign_files(out_dir, model.hash)
        if args.overwrite:  # the cohort's own files are replaced; others would still mix
            ours = {feature_file_name(r.slide) for r in rows}
            foreign = [name for name in foreign if name not in ours]
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            hint = "" if args.overwrite else " (--overwrite replaces the cohort's own files)"
            raise _UsageError(
                f"{out_dir} holds {len(foreign)} feature file(s) of another model "
                f"({shown}); refusing to mix models: use another --out{hint}"
            )
        bar = tqdm(
            total=len(rows),
            unit="slide",
            desc="features",
            disable=True if args.quiet else None,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()

        def on_done(outcome: SlideOutcome) -> None:
            bar.update(1)
            elapsed = time.perf_counter() - t0
            if elapsed > 0:
                bar.set_postfix_str(f"{bar.n * 3600.0 / elapsed:.0f} slides/h", refresh=False)

        try:
            outcomes = await extract_features(
                client,
                rows,
                out_dir,
                model,
                options,
                jobs=args.jobs,
                overwrite=args.overwrite,
                on_done=on_done,
                retries=args.retries - 1,
            )
        finally:
            bar.close()
    write_index(out_dir, outcomes)
    return outcomes


run_analyze = _guarded("analyze", _analyze)
run_info = _guarded("info", _info)
run_evaluate = _guarded("evaluate", _evaluate)
run_features = _guarded("features", _features)


def main(argv: list[str] | None = None) -> int:
    """Run the client commands alone (``python -m histohelper.client.cli``)."""
    parser = argparse.ArgumentParser(prog="histohelper")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``histohelper export``: freeze the model into a TorchScript artifact, or inspect one.

Heavy imports (torch, torchvision, onnx) happen inside :func:`run`, so building the
top-level parser stays light.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable

_DESCRIPTION = """\
Export the HistoHelper model: a torchvision ResNet18 patch classifier (its own fc is
the patch head; embeddings are the 512-d pooled layer4 features; class activation maps
come from layer4 weighted by the fc weights) and a gated-attention MIL slide head
(Ilse, Tomczak & Welling, ICML 2018), scripted into ONE TorchScript file with an
embedded JSON manifest, optionally with an ONNX file of the patch path beside it.

The artifact takes raw uint8 RGB patches [B, H, W, 3] and normalises inside.
Nothing is written unless every parity gate passes (TorchScript vs eager fp32:
max |dp| <= 1e-5; onnxruntime vs eager: <= 1e-4; bf16/fp16 vs fp32 on calibration
patches: argmax agreement >= 99 % and max |dp| <= 0.02, else the variant is recorded
as failed and not served).

Without --weights/--mil-weights the model is randomly initialised from --seed, the
manifest says "untrained": true, and a warning is printed: such a model is for
testing the pipeline only.
"""

_EPILOG = """\
examples:
  histohelper export artifacts/model.pt
  histohelper export artifacts/model.pt --weights histohelper_production.pth \\
      --mil-weights mil_head.pth --calibration-slide slides/CMU-1-Small-Region.svs --onnx
  histohelper export artifacts/tropism.pt --slide-classes pulmonary cerebral
  histohelper export --inspect artifacts/model.pt
"""


def _names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export`` on the top-level ``histohelper`` parser."""
    p = subparsers.add_parser(
        "export",
        help="freeze the model into a TorchScript artifact (+ ONNX), or --inspect one",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "out",
        nargs="?",
        metavar="OUT",
        help="artifact to write (.pt); the ONNX file goes beside it with suffix .onnx",
    )
    p.add_argument(
        "--inspect",
        metavar="MODEL",
        help="print the manifest embedded in MODEL as JSON and exit (loads no weights)",
    )
    _add_weight_flags(p)
    _add_model_flags(p)
    _add_check_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log the parity figures")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no stage lines on stderr (export takes ~30 s)"
    )
    p.set_defaults(func=run, _parser=p)
    _add_train_mil(subparsers)


_TRAIN_DESCRIPTION = """\
Train the gated-attention MIL slide head (the module `histohelper export` freezes) on
the per-slide HDF5 features written by `histohelper features`, from slide labels.

COHORT is a CSV with columns slide, label (required), patient (default: the slide) and
split (train/val/test; without it: patient-level stratified k-fold cross-validation).
Class-weighted cross-entropy, Adam, dropout, early stopping on the validation fold's
loss; the final head is trained on every training slide for the median of the folds'
best epoch counts. CPU only; deterministic under --seed; bags are held in memory, or
streamed from their HDF5 files when they exceed --max-memory-gib (or with --stream):
the same result either way.

Writes OUT (a state_dict that `histohelper export --mil-weights` loads, plus the class
names), and beside it report.json (per fold and pooled out-of-fold AUC with patient-level
bootstrap 95 % CI, balanced accuracy, sensitivity/specificity with Wilson 95 % intervals,
confusion matrix), roc.png and loss.png.

A bad cohort is refused before any training (exit status 2).
"""

_TRAIN_EPILOG = """\
examples:
  histohelper train-mil cohort.csv --features features/ --out runs/mil_head.pt
  histohelper export artifacts/tropism.pt --mil-weights runs/mil_head.pt \\
      --slide-classes cerebral pulmonary
"""


def _add_train_mil(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train-mil`` on the top-level ``histohelper`` parser."""
    p = subparsers.add_parser(
        "train-mil",
        help="train the attention-MIL slide head from slide labels on HDF5 features",
        description=_TRAIN_DESCRIPTION,
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cohort", metavar="COHORT", help="cohort CSV (slide, label[, patient, split])")
    p.add_argument(
        "--features",
        required=True,
        metavar="DIR",
        help="folder of per-slide HDF5 bags and features_index.csv (histohelper features)",
    )
    p.add_argument("--out", required=True, metavar="PT", help="head checkpoint to write")
    p.add_argument(
        "--report-dir", metavar="DIR", help="report.json and plots (default: OUT's folder)"
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    p.add_argument(
        "--max-epochs", type=int, default=100, help="epochs per fold at most (default: 100)"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=10,
        help="early stopping: epochs without a lower validation loss (default: 10)",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: 2e-4)")
    p.add_argument(
        "--weight-decay", type=float, default=1e-5, help="Adam weight decay (default: 1e-5)"
    )
    p.add_argument("--dropout", type=float, default=0.25, help="training dropout (default: 0.25)")
    p.add_argument(
        "--attention-dim",
        type=int,
        default=128,
        help="hidden size L of the gated attention; give export the same (default: 128)",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="slide class names in output order (default: the labels, sorted); give "
        "export --slide-classes the same order",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip roc.png and loss.png")
    p.add_argument(
        "--stream",
        action="store_true",
        help="stream bags from HDF5 even when they fit in --max-memory-gib",
    )
    p.add_argument(
        "--max-memory-gib",
        type=float,
        metavar="GIB",
        help="memory budget for bags in GiB: above it they are streamed from HDF5, with an "
        "LRU of at most this size (default: half of MemAvailable)",
    )
    p.set_defaults(func=run_train_mil, _parser=p)


def run_train_mil(args: argparse.Namespace) -> int:
    """Run ``histohelper train-mil``. Returns 0, or 2 for a refused cohort."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from .train_mil import BagOptions, CohortError, TrainOptions, train_mil

    try:
        opts = TrainOptions(
            folds=args.folds,
            seed=args.seed,
            max_epochs=args.max_epochs,
            patience=args.patience,
            lr=args.lr,
            weight_decay=args.weight_decay,
            dropout=args.dropout,
            attention_dim=args.attention_dim,
            bootstrap=args.bootstrap,
            classes=tuple(_names(args.classes) or ()) or None,
            plots=not args.no_plots,
        )
        if args.max_memory_gib is not None and args.max_memory_gib < 0:
            raise CohortError("--max-memory-gib must be >= 0")
        bag_opts = BagOptions(
            stream=True if args.stream else None,
            max_memory_bytes=None
            if args.max_memory_gib is None
            else int(args.max_memory_gib * 2**30),
        )
        result = train_mil(
            args.cohort, args.features, args.out, opts, args.report_dir, bag_opts=bag_opts
        )
    except CohortError as exc:
        print(f"histohelper train-mil: error: {exc}\nnothing was trained.", file=sys.stderr)
        return 2
    rep = result.report
    pooled = rep["pooled_out_of_fold"]
    auc = pooled["auc"]
    classes = " ".join(rep["classes"])
    print(
        f"wrote {args.out}: {rep['scheme']}, out-of-fold AUC {auc['value']} "
        f"(95 % CI {auc['ci95'][0]}-{auc['ci95'][1]}), balanced accuracy "
        f"{pooled['balanced_accuracy']['value']}; final head {rep['final']['epochs']} epochs."
        f"\nexport it with: --mil-weights {args.out} --slide-classes {classes} "
        f"--attention-dim {args.attention_dim}"
    )
    return 0


def _add_weight_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags of ``histohelper export``."""
    w = p.add_argument_group("weights")
    w.add_argument(
        "--weights",
        metavar="PTH",
        help="torchvision-style resnet18 checkpoint whose fc has one output per patch class "
        "(bare state_dict, or wrapped in {'state_dict': ...} / {'model': ...}; 'module.' "
        "prefixes are stripped). Default: seeded random init (untrained)",
    )
    w.add_argument(
        "--mil-weights",
        metavar="PTH",
        help="state_dict of the gated attention MIL head (keys attention_V.0.*, "
        "attention_U.0.*, attention_weights.*, classifier.*), or train-mil's mil_head.pt: "
        "its slide classes, dropout (for --mc-dropout-passes) and training provenance go "
        "into the manifest. Default: seeded random init",
    )
    w.add_argument(
        "--mil-report",
        metavar="JSON",
        help="train-mil's report.json recorded as the head's provenance (default: the "
        "report.json beside --mil-weights, if any)",
    )
    w.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random init and of the fixed check batches (default: 0)",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model-shape flags (classes, patch size, resolution, names)."""
    m = p.add_argument_group("model")
    m.add_argument(
        "--patch-classes",
        nargs="+",
        default=["benign", "malignant"],
        metavar="NAME",
        help="patch class names in fc output order, space- or comma-separated "
        "(default: benign malignant)",
    )
    m.add_argument(
        "--slide-classes",
        nargs="+",
        metavar="NAME",
        help="slide class names of the MIL head, e.g. 'pulmonary cerebral' for organ "
        "tropism (default: train-mil's checkpoint's classes, else same as "
        "--patch-classes; must equal the checkpoint's when both are given)",
    )
    m.add_argument(
        "--attention-dim",
        type=int,
        default=128,
        help="hidden size L of the gated attention (default: 128)",
    )
    m.add_argument(
        "--patch-size-px",
        type=int,
        default=224,
        help="patch size in pixels, a multiple of 32 (default: 224)",
    )
    m.add_argument(
        "--target-mpp",
        type=float,
        default=0.5,
        help="resolution the server reads patches at, micrometres per pixel (default: 0.5)",
    )
    m.add_argument(
        "--model-name",
        default="histohelper-resnet18-gated-mil",
        help="model name recorded in the manifest",
    )
    m.add_argument(
        "--model-version", default="0.1.0", help="model version recorded in the manifest"
    )
    m.add_argument(
        "--stain-method",
        choices=("none", "macenko", "reinhard"),
        default="none",
        help="stain normalisation the model was trained with, declared in the manifest: "
        "the server applies it by default (default: none)",
    )
    m.add_argument(
        "--stain-reference",
        metavar="IMG",
        help="reference image of that normalisation (PNG/JPEG/TIFF of typical H&E): every "
        "method's target is fitted on it and recorded (default: the published reference)",
    )


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    """The precision-variant, calibration and ONNX flags."""
    c = p.add_argument_group("precision variants and checks")
    c.add_argument(
        "--variants",
        nargs="*",
        default=["bf16", "fp16"],
        choices=["bf16", "fp16"],
        metavar="PREC",
        help="reduced precisions to check and offer: bf16 (CPUs with AVX512-BF16/AMX, "
        "CUDA), fp16 (CUDA, MPS). Give the flag with no value for fp32 only "
        "(default: bf16 fp16)",
    )
    c.add_argument(
        "--calibration-slide",
        metavar="SLIDE",
        help="slide whose tissue patches (fixed grid, white patches dropped) check the "
        "variants against fp32; default: seeded synthetic patches. Recorded in the manifest",
    )
    c.add_argument(
        "--calibration-patches",
        type=int,
        default=256,
        help="at most this many calibration patches (default: 256)",
    )
    c.add_argument(
        "--strict-variants",
        action="store_true",
        help="fail the export when a variant misses its gate (default: record it as "
        "failed; the runtime never serves it)",
    )
    c.add_argument(
        "--onnx",
        action="store_true",
        help="also export the patch path (uint8 NHWC in; logits, embeddings, CAMs out) to "
        "ONNX, check it with onnx.checker and onnxruntime",
    )
    c.add_argument(
        "--onnx-int8",
        action="store_true",
        help="with --onnx: also write an int8 (static QDQ) ONNX model calibrated on the "
        "calibration patches, if it passes the reduced-precision gate under ONNX Runtime; "
        "gated again under OpenVINO (unquantised layers f32, and bf16 where this CPU has "
        "AVX512-BF16/AMX). CPUs with VNNI serve it (measured on a 2-core AVX512-VNNI/BF16 "
        "EPYC: ~190 patches/s with OpenVINO int8+bf16, ~120 ONNX Runtime int8, ~60 fp32)",
    )
    c.add_argument("--onnx-opset", type=int, default=18, help="ONNX opset, >= 17 (default: 18)")


def _stage_printer() -> Callable[[str], None]:
    """Prints each export stage on stderr with the seconds since the command started."""
    t0 = time.perf_counter()

    def stage(text: str) -> None:
        print(f"export: {text} (at {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    return stage


def run(args: argparse.Namespace) -> int:
    """Run ``histohelper export``. Returns the exit status (0 ok, 1 failed, 2 usage)."""
    from histohelper.errors import HistoHelperError

    if args.inspect:
        from histohelper.server.runtime.manifest import read_manifest

        try:
            text = read_manifest(args.inspect).to_json()
        except HistoHelperError as exc:
            print(f"histohelper export: error: {exc} [{exc.reason}]", file=sys.stderr)
            return 1
        print(text, flush=True)  # a broken pipe (`| head`) ends quietly in histohelper.cli
        return 0
    if not args.out:
        args._parser.error("OUT is required unless --inspect is given")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .export import ExportOptions, UntrainedModelWarning, export_model

    def show(message: object, category: type[Warning], *_: object, **__: object) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show  # restored by catch_warnings
        warnings.simplefilter("always", UntrainedModelWarning)
        warnings.simplefilter("always", RuntimeWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            options = ExportOptions(
                weights=args.weights,
                mil_weights=args.mil_weights,
                mil_report=args.mil_report,
                patch_classes=_names(args.patch_classes) or [],
                slide_classes=_names(args.slide_classes),
                model_name=args.model_name,
                model_version=args.model_version,
                patch_size_px=args.patch_size_px,
                target_mpp=args.target_mpp,
                attention_dim=args.attention_dim,
                seed=args.seed,
                variants=args.variants,
                calibration_slide=args.calibration_slide,
                calibration_patches=args.calibration_patches,
                onnx=args.onnx,
                onnx_int8=args.onnx_int8,
                onnx_opset=args.onnx_opset,
                strict_variants=args.strict_variants,
                stain_method=args.stain_method,
                stain_reference=args.stain_reference,
            )
            progress = None if args.quiet else _stage_printer()
            manifest = export_model(args.out, options, progress=progress)
        except HistoHelperError as exc:
            print(f"error: {exc}\nno artifact was written.", file=sys.stderr)
            return 1
    served = ", ".join(manifest.precision_names())
    extra = f" and {manifest.onnx.file_name}" if manifest.onnx else ""
    if manifest.onnx is not None and manifest.onnx.int8_file_name:
        extra += f" and {manifest.onnx.int8_file_name}"
    print(f"wrote {args.out}{extra} (precisions: {served}; untrained: {manifest.untrained})")
    return 0

"""Helpers of the metrics tests: a small slide, a free port, calls, and a scrape.

The slide is a generated 1,024 x 1,024 px pyramid at 0.5 um/px, tissue over most of
it (16 patches of 224 px at the model's 0.5 mpp): an analysis takes about a second.
"""

from __future__ import annotations

import socket
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from synthetic_slides import slide_with_tissue, write_slide

from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

SLIDE = "tissue.tiff"
MISSING = "no-such-slide.tiff"
#: Labels of a sample, as a sorted tuple of (name, value) pairs.
Labels = tuple[tuple[str, str], ...]


def make_slide_root(root: Path) -> Path:
    """Write :data:`SLIDE` into ``root`` and return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    image = slide_with_tissue(1024, 1024, [(32, 32, 960, 960)], seed=3)
    write_slide(root / SLIDE, image, [(512, 512), (256, 256)], mpp=0.5)
    return root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def analyze(target: str, slide: str = SLIDE) -> list[pb.AnalyzeSlideResponse]:
    """Run AnalyzeSlide to its end (raises grpc.RpcError on failure)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SlideAnalysisServiceStub(channel)
        return list(stub.AnalyzeSlide(pb.AnalyzeSlideRequest(slide_path=slide), timeout=120))


def analyze_error(target: str, slide: str = MISSING) -> grpc.StatusCode:
    """Run an AnalyzeSlide that must fail; its status code."""
    try:
        analyze(target, slide)
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError("the analysis did not fail")


def scrape_text(port: int) -> str:
    """The metrics endpoint's exposition (Prometheus text format)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[str, dict[Labels, float]]:
    """Sample values by sample name (``..._total``, ``..._count``) and labels."""
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def family_names(text: str) -> set[str]:
    """Every sample name the exposition holds (what PromQL can name)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}

"""A result far larger than gRPC's 4 MiB default arrives in chunks, each far below it.

A 32 px model (cheap on the CPU) over the real slide with 2x overlap and embeddings
gives thousands of patches and well over 4 MiB in total; the client keeps gRPC's
default 4 MiB receive limit to prove no single message needs more.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest

from histohelper.server.app import start_server
from histohelper.server.config import ServerConfig
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

FOUR_MIB = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histohelper.model_export.export import export_model

    out = tmp_path_factory.mktemp("small-model") / "model-32px.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(out, patch_size_px=32, variants=())
    return out


def test_result_over_4mib_streams_in_small_messages(small_model: Path, slides_dir: Path) -> None:
    running = start_server(
        ServerConfig(
            model_path=small_model, slide_root=slides_dir, port=0, precision="fp32", batch_size=64
        )
    )
    try:
        with grpc.insecure_channel(running.target) as channel:  # default 4 MiB receive limit
            stub = pb_grpc.SlideAnalysisServiceStub(channel)
            request = pb.AnalyzeSlideRequest(
                slide_path="real/CMU-1-Small-Region.svs",
                options=pb.AnalysisOptions(
                    stride_px=16, return_embeddings=True, return_attention=True
                ),
            )
            sizes = []
            seen = set()
            attention_total = 0.0
            for event in stub.AnalyzeSlide(request, timeout=600):
                sizes.append(event.ByteSize())
                if event.HasField("patches"):
                    seen.update(event.patches.patch_index)
                    assert len(event.patches.embeddings) == 512 * len(event.patches.patch_index)
                if event.HasField("attention"):
                    attention_total += float(np.sum(event.attention.attention))
                last = event
    finally:
        running.stop(grace=0)
    total = sum(sizes)
    print(
        f"{len(seen)} patches, {len(sizes)} messages, total {total / 2**20:.1f} MiB, "
        f"largest {max(sizes) / 2**20:.2f} MiB"
    )
    assert last.completed.outcome == pb.ANALYSIS_OUTCOME_COMPLETED
    assert len(seen) == last.completed.qc.patch_count
    assert total > FOUR_MIB
    assert max(sizes) < FOUR_MIB / 2
    assert attention_total == pytest.approx(1.0, abs=1e-3)

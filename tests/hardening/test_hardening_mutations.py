"""2,000 mutated request messages against a real server: byte flips, truncations,
insertions and splices of valid requests of every RPC, sent as raw bytes.

Every call must end with OK or a mapped error (never INTERNAL, never UNKNOWN), the
server must stay healthy, and the audit log must hold exactly one record per call.
Seeded, so a failure reproduces; the statuses seen are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening_support import read_audit

from histohelper.v1 import slide_analysis_pb2 as pb

SERVICE = "/histohelper.v1.SlideAnalysisService/"
MUTATIONS = 2_000
SEED = 20261202
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
TINY = "real/tiny-16px.svs"


def _seeds() -> dict[str, list[list[bytes]]]:
    """Valid requests of each RPC, as the list of messages the call sends."""
    raw = pb.PatchImage(id="p", raw=pb.RawImage(width_px=2, height_px=2, rgb=bytes(12)))
    options = pb.AnalysisOptions(batch_size=4, return_attention=True)
    data = b"\x00" * 64
    upload = [
        pb.UploadSlideRequest(
            metadata=pb.UploadSlideMetadata(
                size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest(), suffix=".svs"
            )
        ),
        pb.UploadSlideRequest(chunk=data),
    ]
    return {
        "GetModelInfo": [[pb.GetModelInfoRequest().SerializeToString()]],
        "AnalyzeSlide": [
            [pb.AnalyzeSlideRequest(slide_path=TINY, options=options).SerializeToString()],
            [
                pb.AnalyzeSlideRequest(
                    slide_path="real/CMU-1-Small-Region.svs",
                    request_id="fuzz-1",
                    options=pb.AnalysisOptions(
                        patch_size_px=448, target_resolution=pb.Resolution(mpp=4.0)
                    ),
                ).SerializeToString()
            ],
        ],
        "ExplainPatches": [
            [
                pb.ExplainPatchesRequest(
                    slide_path=TINY, top_k=pb.TopKSelection(k=1), jpeg_quality=50
                ).SerializeToString()
            ]
        ],
        "ClassifyPatches": [[pb.ClassifyPatchesRequest(images=[raw, raw]).SerializeToString()] * 2],
        "UploadSlide": [[m.SerializeToString() for m in upload]],
    }


KINDS = {
    "GetModelInfo": "unary_unary",
    "AnalyzeSlide": "unary_stream",
    "ExplainPatches": "unary_stream",
    "ClassifyPatches": "stream_stream",
    "UploadSlide": "stream_unary",
}


def mutate(rng: random.Random, message: bytes) -> bytes:
    """One random mutation of a serialised message."""
    data = bytearray(message)
    op = rng.randrange(6)
    if op == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1 and data:  # truncate
        del data[rng.randrange(len(data)) :]
    elif op == 2:  # insert random bytes
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif op == 3 and data:  # overwrite a byte with an extreme value
        data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
    elif op == 4:  # splice a field of another message
        data += rng.choice([b"\x08\xff\xff\xff\xff\x0f", b"\x12\x00", b"\x1a\x05hello", b"\xff"])
    else:  # random bytes of similar length
        data = bytearray(rng.randbytes(max(1, len(data) + rng.randint(-4, 4))))
    return bytes(data)


def call_once(channel: grpc.Channel, rpc: str, messages: list[bytes]) -> grpc.StatusCode:
    """Send one call of raw messages; its final status code."""
    method = getattr(channel, KINDS[rpc])(SERVICE + rpc)
    try:
        if KINDS[rpc] == "unary_unary":
            method(messages[0], timeout=60)
        elif KINDS[rpc] == "unary_stream":
            for _ in method(messages[0], timeout=60):
                pass
        elif KINDS[rpc] == "stream_unary":
            method(iter(messages), timeout=60)
        else:
            for _ in method(iter(messages), timeout=60):
                pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_mutated_messages_get_mapped_statuses_and_one_audit_record_each(
    start_inprocess_server, tmp_path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    running = start_inprocess_server(
        audit_log=audit_path,
        max_patches_per_slide=64,
        max_images_per_request=8,
        upload_dir=tmp_path / "uploads",
        max_concurrent_analyses=2,
    )
    rng = random.Random(SEED)
    seeds = _seeds()
    rpcs = sorted(seeds)
    seen: dict[str, Counter[str]] = {rpc: Counter() for rpc in rpcs}
    bad: list[tuple[str, str, str]] = []
    calls: Counter[str] = Counter()
    with grpc.insecure_channel(running.target) as channel:
        for _ in range(MUTATIONS):
            rpc = rng.choice(rpcs)
            messages = list(rng.choice(seeds[rpc]))
            which = rng.randrange(len(messages))
            messages[which] = mutate(rng, messages[which])
            code = call_once(channel, rpc, messages)
            calls[rpc] += 1
            seen[rpc][code.name] += 1
            if code in FORBIDDEN:
                bad.append((rpc, code.name, messages[which].hex()[:80]))
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    running.stop(grace=5)
    for rpc in rpcs:
        print(f"{rpc}: {dict(seen[rpc])}")
    assert not bad, bad[:10]
    records = Counter(r["rpc"] for r in read_audit(audit_path))
    assert records == calls, (records, calls)

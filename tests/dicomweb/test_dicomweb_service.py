"""AnalyzeSlide and StoreDicom over a real Orthanc PACS, through a real gRPC server.

Acceptance of issue 18 (server side): the real slide analysed from its SVS file and
from the PACS gives the same grid and the same probabilities (wsidicomizer copied the
JPEG tiles, so the pixels are identical); AnalysisStarted.dicom names the series; every
bad case gets its status and reason, and the server keeps serving after each.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from orthanc_support import (
    DicomWebSlide,
    Orthanc,
    delete_series,
    free_port,
    store_as_fluorescence,
    store_copy,
    store_with_broken_frames,
)
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from histohelper.client._channel import RetryPolicy
from histohelper.client.cohort import CohortProgress, CohortSlide
from histohelper.client.cohort_runner import retry_line
from histohelper.client.sync import SlideClient
from histohelper.errors import PacsUnavailableError
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

SVS = "real/CMU-1-Small-Region.svs"


def insecure_stub(target: str) -> pb_grpc.SlideAnalysisServiceStub:
    return pb_grpc.SlideAnalysisServiceStub(grpc.insecure_channel(target))


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and ErrorInfo reason of a failed call."""
    reason = ""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return err.code(), reason


def _ct_instance(study_uid: str) -> bytes:
    """A tiny CT image (8 x 8 px) as DICOM Part 10 bytes, in ``study_uid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "TEST", "Test^Ct"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(
    model_artifact: Path,
    served_runtime,
    slides_dir: Path,
    dicomweb_slide: DicomWebSlide,
    orthanc_auth: Orthanc,
    tmp_path_factory: pytest.TempPathFactory,
):
    """A real in-process server with three DICOMweb servers configured: ``pacs`` (the
    Orthanc holding the slide), ``locked`` (Orthanc with authentication, wrong
    password in the secrets folder) and ``down`` (a closed loopback port)."""
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    secrets = tmp_path_factory.mktemp("dicomweb-secrets")
    (secrets / "locked.basic").write_text("histo:wrong-password")
    servers = ",".join(
        [
            f"pacs={dicomweb_slide.server.dicomweb_url}",
            f"locked={orthanc_auth.dicomweb_url}",
            f"down=http://127.0.0.1:{free_port()}/dicom-web",
        ]
    )
    config = ServerConfig(
        model_path=model_artifact,
        slide_root=slides_dir,
        port=0,
        precision="fp32",
        grace_s=2.0,
        dicomweb=servers,
        dicomweb_secrets_dir=secrets,
        audit_log=secrets.parent / "audit.jsonl",
    )
    running = start_server(config, runtime=served_runtime)
    yield running
    running.stop(grace=0, drain=0)


def _analyze(stub, request: pb.AnalyzeSlideRequest):
    started, probs, boxes = None, {}, {}
    for msg in stub.AnalyzeSlide(request, timeout=300):
        kind = msg.WhichOneof("event")
        if kind == "started":
            started = msg.started
        elif kind == "patches":
            p = msg.patches
            k = p.num_classes
            for j, i in enumerate(p.patch_index):
                probs[i] = list(p.probabilities[j * k : (j + 1) * k])
                boxes[i] = (p.x_l0[j], p.y_l0[j], p.width_l0[j], p.height_l0[j])
    return started, probs, boxes


def _series(dicomweb_slide: DicomWebSlide, server_name: str = "pacs", **uids: str):
    return pb.DicomWebSeries(
        server=server_name,
        study_instance_uid=uids.get("study", dicomweb_slide.study_instance_uid),
        series_instance_uid=uids.get("series", dicomweb_slide.series_instance_uid),
    )


def test_same_grid_and_probabilities_from_file_and_pacs(
    server, dicomweb_slide: DicomWebSlide
) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    s_file, p_file, b_file = _analyze(stub, pb.AnalyzeSlideRequest(slide_path=SVS))
    s_pacs, p_pacs, b_pacs = _analyze(
        stub, pb.AnalyzeSlideRequest(dicomweb=_series(dicomweb_slide))
    )
    assert len(p_file) > 0
    assert b_pacs == b_file  # identical grid: every level-0 box
    assert s_pacs.grid == s_file.grid
    np.testing.assert_array_equal(
        np.array([p_pacs[i] for i in sorted(p_pacs)]), np.array([p_file[i] for i in sorted(p_file)])
    )
    assert s_pacs.grid.mpp_source == "metadata"
    dicom = s_pacs.dicom
    assert dicom.dicomweb_server == "pacs"
    assert dicom.study_instance_uid == dicomweb_slide.study_instance_uid
    assert dicom.series_instance_uid == dicomweb_slide.series_instance_uid
    assert dicom.frame_of_reference_uid
    source = pydicom.Dataset.from_json(json.loads(dicom.source_image_json))
    assert source.SeriesInstanceUID == dicomweb_slide.series_instance_uid
    assert "PixelData" not in source and "PerFrameFunctionalGroupsSequence" not in source
    assert not s_file.HasField("dicom")


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("unconfigured", grpc.StatusCode.INVALID_ARGUMENT, "DICOMWEB_NOT_CONFIGURED"),
        ("leading_zero_uid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPTIONS"),
        ("unknown_series", grpc.StatusCode.NOT_FOUND, "SLIDE_NOT_FOUND"),
        ("unknown_study", grpc.StatusCode.NOT_FOUND, "SLIDE_NOT_FOUND"),
        ("not_a_wsi", grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_UNSUPPORTED"),
        ("unreachable", grpc.StatusCode.UNAVAILABLE, "PACS_UNAVAILABLE"),
        ("credentials_refused", grpc.StatusCode.PERMISSION_DENIED, "PACS_PERMISSION_DENIED"),
        ("broken_frames", grpc.StatusCode.DATA_LOSS, "SLIDE_CORRUPT"),
        ("fluorescence", grpc.StatusCode.INVALID_ARGUMENT, "SLIDE_UNSUPPORTED"),
    ],
)
def test_bad_cases_and_the_server_keeps_serving(
    server, dicomweb_slide: DicomWebSlide, case: str, code, reason: str
) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    if case == "not_a_wsi":  # a CT series stored in the same study through StoreDicom
        data = _ct_instance(dicomweb_slide.study_instance_uid)
        stored = stub.StoreDicom(
            iter(
                [
                    pb.StoreDicomRequest(dicomweb_server="pacs"),
                    pb.StoreDicomRequest(instance_size_bytes=len(data)),
                    pb.StoreDicomRequest(chunk=data[:100]),
                    pb.StoreDicomRequest(chunk=data[100:]),
                ]
            ),
            timeout=60,
        )
        ct = pydicom.dcmread(io.BytesIO(data))
        assert list(stored.sop_instance_uids) == [ct.SOPInstanceUID]
        series = _series(dicomweb_slide, series=ct.SeriesInstanceUID)
    elif case == "fluorescence":
        series = _series(dicomweb_slide, series=store_as_fluorescence(dicomweb_slide)[1])
    elif case == "broken_frames":  # 1 frame in 7 undecodable: past the 5 % tolerance
        _, series_uid = store_with_broken_frames(dicomweb_slide, lambda i: i % 7 == 3)
        series = _series(dicomweb_slide, series=series_uid)
    else:
        series = {
            "unconfigured": _series(dicomweb_slide, "elsewhere"),
            # PS3.5 9.1: no leading zero in a component (the client refuses it too)
            "leading_zero_uid": _series(dicomweb_slide, series="1.2.03.4"),
            "unknown_series": _series(dicomweb_slide, series="1.2.3.4.5"),
            "unknown_study": _series(dicomweb_slide, study="1.2.3.4", series="1.2.3.4.5"),
            "unreachable": _series(dicomweb_slide, "down"),
            "credentials_refused": _series(dicomweb_slide, "locked"),
        }[case]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnalyzeSlide(pb.AnalyzeSlideRequest(dicomweb=series), timeout=120))
    assert status_of(info.value) == (code, reason)
    details = info.value.details() or ""
    assert "wrong-password" not in details and "127.0.0.1" not in details
    if case == "unreachable":
        assert "retry" in details
    # The server keeps serving (the PACS analysis itself: the last test of the module).
    ok = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert ok.model.name


def test_a_series_deleted_on_the_pacs_is_not_analysed_from_the_pool(
    server, dicomweb_slide: DicomWebSlide
) -> None:
    """The pooled opened series is only a speed-up: once the series is deleted on the
    PACS, the next analysis asks the PACS again and gets SLIDE_NOT_FOUND."""
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    study, series_uid = store_copy(dicomweb_slide)
    series = _series(dicomweb_slide, study=study, series=series_uid)
    started, probs, _ = _analyze(stub, pb.AnalyzeSlideRequest(dicomweb=series))
    assert started is not None and len(probs) == started.grid.patch_count > 0
    delete_series(dicomweb_slide.server, series_uid)
    for _ in range(2):  # and the pool keeps no stale entry
        with pytest.raises(grpc.RpcError) as info:
            list(stub.AnalyzeSlide(pb.AnalyzeSlideRequest(dicomweb=series), timeout=120))
        assert status_of(info.value) == (grpc.StatusCode.NOT_FOUND, "SLIDE_NOT_FOUND")


def test_store_dicom_refuses_what_is_not_part10(server) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    junk = b"not a dicom file" * 10
    with pytest.raises(grpc.RpcError) as info:
        stub.StoreDicom(
            iter(
                [
                    pb.StoreDicomRequest(dicomweb_server="pacs"),
                    pb.StoreDicomRequest(instance_size_bytes=len(junk)),
                    pb.StoreDicomRequest(chunk=junk),
                ]
            ),
            timeout=60,
        )
    assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "DICOM_INVALID")
    with pytest.raises(grpc.RpcError) as info:
        stub.StoreDicom(iter([pb.StoreDicomRequest(dicomweb_server="elsewhere")]), timeout=60)
    assert status_of(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "DICOMWEB_NOT_CONFIGURED")


def test_after_every_bad_case_the_pacs_slide_still_analyses(
    server, dicomweb_slide: DicomWebSlide
) -> None:
    stub = insecure_stub(f"127.0.0.1:{server.port}")
    started, probs, _ = _analyze(stub, pb.AnalyzeSlideRequest(dicomweb=_series(dicomweb_slide)))
    assert started is not None and started.dicom.dicomweb_server == "pacs"
    assert len(probs) == started.grid.patch_count > 0


DOWN_URI = "dicomweb://down/1.2.826.0.1.3680043/1.2.826.0.1.3680043.7"


def _analyze_calls(server) -> int:
    """AnalyzeSlide records in the server's audit log (one per call that reached it)."""
    audit = server.config.audit_log
    lines = audit.read_text().splitlines() if audit.exists() else []
    return sum(1 for line in lines if "AnalyzeSlide" in line)


def test_grpc_does_not_retry_pacs_unavailable_silently(server) -> None:
    """The client's channel retries UNAVAILABLE (5 attempts), but the server's pushback
    (grpc-retry-pushback-ms -1) stops it for PACS_UNAVAILABLE: one call, not five."""
    before = _analyze_calls(server)
    client = SlideClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(max_attempts=5))
    with client, pytest.raises(PacsUnavailableError) as info:
        client.analyze(DOWN_URI)
    assert info.value.metadata["retry_after_s"] == "10"
    assert _analyze_calls(server) - before == 1


def test_cohort_retry_of_pacs_unavailable_waits_the_hint_and_is_reported(server) -> None:
    before = _analyze_calls(server)
    events: list[CohortProgress] = []
    with SlideClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(max_attempts=5)) as client:
        (outcome,) = list(
            client.analyze_many([CohortSlide(DOWN_URI)], retries=1, on_progress=events.append)
        )
    assert isinstance(outcome.error, PacsUnavailableError) and outcome.attempts == 2
    (retry,) = [e for e in events if e.kind == "retry"]
    assert retry.delay_s >= 10.0  # the server's retry_after_s, not the 0.5 s backoff
    assert _analyze_calls(server) - before == 2  # each attempt one call: no silent ones
    line = retry_line(retry, attempts=2)
    assert line.startswith("retrying (attempt 2/2) after 10.0 s: PACS_UNAVAILABLE (request id ")
    assert "1.2.826" not in line and "down" not in line

"""``dicomweb://NAME/STUDY_UID/SERIES_UID`` slide URIs: parsing, requests, cohort inputs,
safe output names, the StoreDicom request stream, and ``analyze --dicom-out`` against a
scripted real gRPC server."""

from __future__ import annotations

from pathlib import Path

import pytest
from client_fakes import ScriptedServer, StreamSpec, build_stream

from histohelper.client.cli import main
from histohelper.client.cohort_runner import (
    assign_ids,
    slides_from_arguments,
    slides_from_manifest,
)
from histohelper.client.dicomweb import (
    DicomWebSlide,
    as_dicomweb,
    display_name,
    store_requests,
)
from histohelper.client.explain import explain_request
from histohelper.client.features import feature_file_name, slide_stem
from histohelper.client.options import AnalysisOptions, analyze_request
from histohelper.cohort_csv import CohortError
from histohelper.errors import SlidePathError
from histohelper.v1 import slide_analysis_pb2 as pb

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"
URI = f"dicomweb://pacs/{STUDY}/{SERIES}"


def test_parse_round_trip() -> None:
    slide = DicomWebSlide.parse(URI)
    assert (slide.server, slide.study_instance_uid, slide.series_instance_uid) == (
        "pacs",
        STUDY,
        SERIES,
    )
    assert slide.uri == URI == str(slide)
    assert DicomWebSlide.parse(URI + "/") == slide
    assert DicomWebSlide.parse("DICOMWEB://pacs/1.2/3.4").series_instance_uid == "3.4"
    assert as_dicomweb("real/x.svs") is None


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("dicomweb://pacs/1.2.3", "2 part"),
        ("dicomweb://pacs/1.2/3.4/5.6", "4 part"),
        ("dicomweb://pacs//1.2", "study instance UID is missing"),
        ("dicomweb://pacs/1.2.abc/1.2", "study instance UID is not a DICOM UID"),
        ("dicomweb://pacs/1.2/1.02", "series instance UID is not a DICOM UID"),
        ("dicomweb://pacs/1.2/1." + "2" * 63, "at most 64"),
        ("dicomweb://pacs/1.2/1..2", "series instance UID is not"),
        ("dicomweb://http:/x/1.2/3.4", "no user, port"),
        ("dicomweb://pacs:8042/1.2/3.4", "no user, port"),
        ("dicomweb://user@pacs/1.2/3.4", "no user, port"),
        ("dicomweb://pacs/1.2/3.4?x=1", "no user, port"),
        ("dicomweb://-pacs/1.2/3.4", "server NAME"),
    ],
    ids=[
        "two-parts", "four-parts", "empty-study", "letters", "leading-zero", "too-long",
        "empty-component", "url", "port", "user", "query", "bad-name",
    ],
)  # fmt: skip
def test_malformed_uris_are_refused_without_echoing_uids(uri: str, message: str) -> None:
    with pytest.raises(SlidePathError, match=message) as info:
        DicomWebSlide.parse(uri)
    assert info.value.reason == "SLIDE_PATH_INVALID"
    assert "1.02" not in info.value.message and "abc" not in info.value.message


def test_requests_carry_the_series_not_a_path() -> None:
    for slide in (URI, DicomWebSlide.parse(URI)):
        request = analyze_request(slide, AnalysisOptions(), "r1")
        assert request.WhichOneof("source") == "dicomweb"
        assert request.dicomweb == pb.DicomWebSeries(
            server="pacs", study_instance_uid=STUDY, series_instance_uid=SERIES
        )
        explain = explain_request(slide, top_k=2)
        assert explain.WhichOneof("source") == "dicomweb"
        assert explain.dicomweb.series_instance_uid == SERIES
    assert analyze_request("real/x.svs", None, None).slide_path == "real/x.svs"
    with pytest.raises(SlidePathError):
        analyze_request("dicomweb://pacs/1.2", None, None)


def test_output_names_never_hold_a_uid() -> None:
    stem = slide_stem(URI)
    assert stem == DicomWebSlide.parse(URI).safe_id()
    assert stem.startswith("pacs-") and len(stem) == len("pacs-") + 12
    assert STUDY not in feature_file_name(URI) and SERIES not in feature_file_name(URI)
    other = slide_stem(f"dicomweb://pacs/{STUDY}/{SERIES}.1")
    assert other != stem


def test_consoles_show_a_series_by_its_safe_id() -> None:
    assert display_name(URI) == slide_stem(URI)
    assert display_name("dicomweb://pacs/1.2") == "dicomweb://..."
    assert display_name("real/x.svs") == "real/x.svs"
    assert display_name("scans/2023.01.05.svs") == "scans/2023.01.05.svs"


def test_consoles_show_a_local_dicom_file_without_its_uid() -> None:
    """wsidicomizer names files by SOP Instance UID (tester A finding 10(c))."""
    sop = "1.2.826.0.1.3680043.8.498.38125276152732084372779576759751026167"
    shown = display_name(f"cases/{STUDY}/{sop}.dcm")
    assert sop not in shown and STUDY not in shown
    assert shown.startswith("cases/dicom-") and shown.endswith(".dcm")
    assert shown != display_name(f"cases/{STUDY}/{sop}1.dcm")
    assert display_name(f"{sop}.dcm") == shown.split("/")[-1]


def test_cohort_inputs_take_dicomweb_uris(tmp_path: Path) -> None:
    items = assign_ids(slides_from_arguments([URI, "real/x.svs"], slide_root=tmp_path, upload=True))
    assert items[0].slide == URI and items[0].upload is False  # never uploaded
    assert items[0].id == slide_stem(URI)
    assert items[1].upload is True
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide,id\n{URI},case-1\ndicomweb://pacs/{STUDY}/{SERIES}.7,\n")
    rows = assign_ids(slides_from_manifest(manifest, AnalysisOptions(), upload=True))
    assert [r.id for r in rows] == ["case-1", slide_stem(f"dicomweb://pacs/{STUDY}/{SERIES}.7")]
    assert not any(r.upload for r in rows)
    manifest.write_text("slide\nreal/a.svs\ndicomweb://pacs/1.2\n")
    with pytest.raises(CohortError, match=r"line 3: dicomweb:// slide URI has 2 part"):
        slides_from_manifest(manifest, AnalysisOptions(), upload=False)
    with pytest.raises(CohortError, match="study instance UID is not"):
        slides_from_arguments(["dicomweb://pacs/x/1.2"], slide_root=tmp_path, upload=False)


def test_store_requests_announce_each_instance_then_chunk_it(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"b" * 10)
    requests = list(store_requests("pacs", [b"a" * 25, path], chunk_bytes=10))
    kinds = [r.WhichOneof("part") for r in requests]
    assert kinds == [
        "dicomweb_server", "instance_size_bytes", "chunk", "chunk", "chunk",
        "instance_size_bytes", "chunk",
    ]  # fmt: skip
    assert requests[0].dicomweb_server == "pacs"
    assert requests[1].instance_size_bytes == 25 and requests[5].instance_size_bytes == 10
    assert b"".join(r.chunk for r in requests[2:5]) == b"a" * 25
    with pytest.raises(ValueError, match="NAME"):
        next(store_requests("http://pacs", []))
    with pytest.raises(ValueError, match="0 bytes"):
        list(store_requests("pacs", [b""]))


# --- the CLI against a scripted server ------------------------------------------------


def test_analyze_dicom_out_writes_the_objects(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from test_dicom_results import dicom_messages

    scripted.script.messages = dicom_messages()[0]
    out, dcm = tmp_path / "out", tmp_path / "dcm"
    argv = ["analyze", URI, "--server", scripted.target, "--out", str(out), "-q"]
    rc = main([*argv, "--dicom-out", str(dcm), "--upload"])  # --upload: not for a PACS series
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert scripted.script.requests[0].WhichOneof("source") == "dicomweb"
    assert (out / "summary.json").is_file()
    names = sorted(p.name for p in dcm.iterdir())
    assert names == [
        "annotations.dcm", "probability_map_0.dcm", "probability_map_1.dcm",
        "probability_map_2.dcm", "slide_report.dcm",
    ]  # fmt: skip
    assert pydicom.dcmread(dcm / "annotations.dcm").Modality == "ANN"
    assert "DICOM: 5 objects" in captured.out
    assert STUDY not in captured.out + captured.err and SERIES not in captured.out


def test_analyze_dicom_out_of_a_non_dicom_slide_is_a_clear_error(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("highdicom")
    scripted.script.messages, _ = build_stream(StreamSpec())
    out = tmp_path / "out"
    argv = ["analyze", "real/x.svs", "--server", scripted.target, "--out", str(out), "-q"]
    assert main([*argv, "--dicom-out", str(tmp_path / "dcm")]) == 2
    err = capsys.readouterr().err
    assert "not read from DICOM" in err and (out / "summary.json").is_file()
    assert not list((tmp_path / "dcm").iterdir())


def test_stow_needs_dicomweb_slides_and_is_refused_before_the_analysis(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("highdicom")
    argv = ["analyze", "real/x.svs", "--server", scripted.target, "--out", str(tmp_path)]
    assert main([*argv, "--stow"]) == 2
    assert "dicomweb://NAME/STUDY_UID/SERIES_UID" in capsys.readouterr().err
    two = ["analyze", URI, "real/y.svs", "--server", scripted.target, "--out", str(tmp_path)]
    assert main([*two, "--stow", "-q"]) == 2  # a cohort: every slide must be a series
    assert "every slide" in capsys.readouterr().err
    assert scripted.script.calls == 0


def test_cohort_dicom_out_writes_a_folder_per_slide(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("highdicom")
    from test_dicom_results import dicom_messages

    scripted.script.messages = dicom_messages()[0]
    other = f"dicomweb://pacs/{STUDY}/{SERIES}.2"
    out, dcm = tmp_path / "out", tmp_path / "dcm"
    argv = ["analyze", URI, other, "--server", scripted.target, "--out", str(out), "-q"]
    assert main([*argv, "--dicom-out", str(dcm)]) == 0, capsys.readouterr().err
    ids = sorted([slide_stem(URI), slide_stem(other)])
    assert sorted(p.name for p in dcm.iterdir()) == ids
    for slide_id in ids:
        assert (dcm / slide_id / "annotations.dcm").is_file()
        assert (dcm / slide_id / "slide_report.dcm").is_file()
    assert len(scripted.script.requests) == 2
    assert {r.WhichOneof("source") for r in scripted.script.requests} == {"dicomweb"}
    # a re-run skips both; adding --stow is another identity: both redone (and refused
    # by the scripted server, which has no StoreDicom: the slides fail, exit 1)
    assert main([*argv, "--dicom-out", str(dcm)]) == 0
    assert len(scripted.script.requests) == 2
    assert main([*argv, "--dicom-out", str(dcm), "--stow"]) == 1
    assert len(scripted.script.requests) == 4
    assert "DICOM: " in capsys.readouterr().err


def test_cohort_dicom_out_of_non_dicom_slides_fails_them(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    pytest.importorskip("highdicom")
    scripted.script.messages, _ = build_stream(StreamSpec())
    out = tmp_path / "out"
    argv = ["analyze", "a.svs", "b.svs", "--server", scripted.target, "--out", str(out), "-q"]
    assert main([*argv, "--dicom-out", str(tmp_path / "dcm")]) == 1
    assert "not read from DICOM" in capsys.readouterr().err
    with (out / "cohort.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all(r["error"].startswith("DICOM: ") for r in rows)
    assert (out / "a" / "summary.json").is_file()  # the standard files stay

"""The Orthanc fixture itself: the converted slide is stored and served over DICOMweb
(QIDO-RS, WADO-RS metadata and frames), and authentication is enforced where configured."""

from __future__ import annotations

import pydicom
import requests
from orthanc_support import DicomWebSlide, Orthanc

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


def test_stored_series_is_found_and_frames_are_served(dicomweb_slide: DicomWebSlide) -> None:
    client = dicomweb_slide.server.client()
    series = client.search_for_series(
        search_filters={"StudyInstanceUID": dicomweb_slide.study_instance_uid}
    )
    # Other tests store series in the same study (result objects, copies): look for ours.
    found = {pydicom.Dataset.from_json(s).SeriesInstanceUID: s for s in series}
    assert dicomweb_slide.series_instance_uid in found
    assert pydicom.Dataset.from_json(found[dicomweb_slide.series_instance_uid]).Modality == "SM"
    metadata = client.retrieve_series_metadata(
        dicomweb_slide.study_instance_uid, dicomweb_slide.series_instance_uid
    )
    first = pydicom.Dataset.from_json(metadata[0])
    assert first.SOPClassUID == VL_WSI
    frames = client.retrieve_instance_frames(
        dicomweb_slide.study_instance_uid,
        dicomweb_slide.series_instance_uid,
        first.SOPInstanceUID,
        frame_numbers=[1],
        media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),),
    )
    assert frames[0][:2] == b"\xff\xd8"  # a JPEG frame, copied from the SVS tile
    assert dicomweb_slide.uri.startswith("dicomweb://pacs/")


def test_orthanc_refuses_without_credentials(orthanc_auth: Orthanc) -> None:
    assert requests.get(orthanc_auth.dicomweb_url + "/studies", timeout=10).status_code == 401
    with orthanc_auth.session() as session:
        assert session.get(orthanc_auth.dicomweb_url + "/studies", timeout=10).status_code == 200

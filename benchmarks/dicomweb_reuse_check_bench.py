"""What reusing a pooled DICOMweb series costs: the QIDO-RS check before every reuse,
now a query of the series' instances (their SOP Instance UIDs, so that a series given
new levels is opened again; tester A finding 7) against the series query it replaced
(existence only), side by side on a loopback Orthanc, and against opening the series.

``CMU-1-Small-Region.svs`` is converted with wsidicomizer twice: as is (one level, one
instance) and with the missing pyramid levels added (five instances); both are stored
in an Orthanc started here. Each round times ``--calls`` calls of each query per series,
the order alternating between rounds, and one cold open of the series
(:meth:`DicomWebServers.open_series`). Printed per series: medians over the rounds (ms
per call) and the ratio instance query / series query.

Usage: ``.venv/bin/python benchmarks/dicomweb_reuse_check_bench.py [--rounds 5] [--calls 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_support import start_orthanc, stow  # noqa: E402

from histohelper.server.dicomweb import DicomWebServers, parse_endpoints  # noqa: E402

SLIDE = HERE.parent.parent / "shared" / "slides" / "real" / "CMU-1-Small-Region.svs"


def convert(out: Path, levels: bool) -> list[Path]:
    from wsidicomizer import WsiDicomizer

    out.mkdir(parents=True)
    files = WsiDicomizer.convert(
        SLIDE,
        out,
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        workers=1,
        add_missing_levels=levels,
    )
    return [Path(f) for f in files]


def measure(
    servers: DicomWebServers,
    label: str,
    study: str,
    series: str,
    n_instances: int,
    rounds: int,
    calls: int,
) -> None:
    """Time both checks and one open per round for one series; print the medians."""
    client = servers.client("pacs")

    def series_query() -> None:  # the check before this change
        found = client.search_for_series(
            study, fields=["SeriesInstanceUID"], search_filters={"SeriesInstanceUID": series}
        )
        assert found

    def instance_query() -> None:  # the check now
        assert len(servers.check_series("pacs", study, series)) == n_instances

    legs = {"series query": series_query, "instance query": instance_query}
    times: dict[str, list[float]] = {name: [] for name in [*legs, "open"]}
    for r in range(rounds):
        order = list(legs) if r % 2 == 0 else list(legs)[::-1]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                legs[name]()
            times[name].append((time.perf_counter() - t0) * 1000 / calls)
        t0 = time.perf_counter()
        servers.open_series("pacs", study, series).close()
        times["open"].append((time.perf_counter() - t0) * 1000)
    med = {name: statistics.median(v) for name, v in times.items()}
    spread = {name: f"{min(v):.1f}-{max(v):.1f}" for name, v in times.items()}
    print(
        f"{label}: series query {med['series query']:.1f} ms ({spread['series query']}), "
        f"instance query {med['instance query']:.1f} ms ({spread['instance query']}), ratio "
        f"{med['instance query'] / med['series query']:.2f}; "
        f"opening the series {med['open']:.0f} ms ({spread['open']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    import pydicom

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        with start_orthanc(work / "orthanc") as pacs:
            servers = DicomWebServers(parse_endpoints(f"pacs={pacs.dicomweb_url}"))
            for label, levels in (("1 instance", False), ("5 instances", True)):
                files = convert(work / label.replace(" ", "-"), levels)
                stow(pacs, files)
                first = pydicom.dcmread(files[0], stop_before_pixels=True)
                study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
                measure(servers, label, study, series, len(files), args.rounds, args.calls)
            servers.close()


if __name__ == "__main__":
    main()

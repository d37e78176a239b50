"""ResultCollector: events built from real protobuf messages -> SlideResult."""

from __future__ import annotations

import math

import numpy as np
import pytest
from client_fakes import StreamSpec, build_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from histohelper.client import (
    AnalysisOptions,
    Attention,
    Completed,
    PatchBatch,
    Progress,
    ResultCollector,
    Started,
    event_from_proto,
)
from histohelper.client.render import overlay
from histohelper.errors import InternalError, InvalidOptionsError
from histohelper.v1 import slide_analysis_pb2 as pb


def collect(msgs: list[pb.AnalyzeSlideResponse]):
    collector = ResultCollector()
    for msg in msgs:
        collector.add(event_from_proto(msg))
    return collector.result()


def test_events_are_typed_and_ordered() -> None:
    msgs, _ = build_stream(StreamSpec())
    events = [event_from_proto(m) for m in msgs]
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Completed)
    kinds = {type(e) for e in events}
    assert kinds == {Started, PatchBatch, Progress, Attention, Completed}
    batch = next(e for e in events if isinstance(e, PatchBatch))
    assert batch.probabilities.dtype == np.float32
    assert batch.probabilities.shape == (len(batch), 3)
    assert batch.x_l0.dtype == np.float64


def test_heatmap_nan_exactly_where_no_patch_and_values_match() -> None:
    spec = StreamSpec()
    msgs, exp = build_stream(spec)
    result = collect(msgs)
    assert result.heatmaps.shape == (3, spec.n_rows, spec.n_cols)
    assert result.heatmaps.dtype == np.float32
    has_patch = np.zeros((spec.n_rows, spec.n_cols), bool)
    has_patch[exp.row, exp.col] = True
    for k in range(3):
        assert np.array_equal(np.isnan(result.heatmaps[k]), ~has_patch)
        np.testing.assert_array_equal(result.heatmaps[k][exp.row, exp.col], exp.probabilities[:, k])
    assert np.array_equal(np.isnan(result.attention_map), ~has_patch)
    np.testing.assert_array_equal(result.attention_map[exp.row, exp.col], exp.attention)
    assert result.heatmap("stroma") is not None
    np.testing.assert_array_equal(result.heatmap("stroma"), result.heatmaps[1])


def test_boxes_are_the_servers_not_recomputed() -> None:
    msgs, exp = build_stream(StreamSpec())
    result = collect(msgs)
    p = result.patches
    got = np.stack([p.x_l0, p.y_l0, p.width_l0, p.height_l0], axis=1)
    np.testing.assert_array_equal(got, exp.boxes)
    # The fake clips edge patches, so boxes differ from the nominal grid somewhere.
    assert np.any(p.width_l0 != result.grid.patch_width_l0)


def test_out_of_order_batches_are_sorted_by_patch_index() -> None:
    msgs, exp = build_stream(StreamSpec())
    first, *middle, last = msgs
    patches = [m for m in middle if m.WhichOneof("event") == "patches"]
    rest = [m for m in middle if m.WhichOneof("event") != "patches"]
    result = collect([first, *reversed(patches), *rest, last])
    np.testing.assert_array_equal(result.patches.patch_index, exp.patch_index)
    np.testing.assert_array_equal(result.patches.probabilities, exp.probabilities)


def test_failed_patches_are_left_out() -> None:
    msgs, exp = build_stream(StreamSpec(failed=(0, 4)))
    result = collect(msgs)
    assert 0 not in result.patches.patch_index and 4 not in result.patches.patch_index
    assert result.patch_count == len(exp.patch_index)
    assert result.qc.failed_patch_count == 2


def test_no_tissue_is_a_result() -> None:
    spec = StreamSpec(no_tissue=True)
    result = collect(build_stream(spec)[0])
    assert result.outcome == "no_tissue"
    assert result.prediction is None
    assert result.patch_count == 0
    assert result.patches.probabilities.shape == (0, 3)
    assert np.isnan(result.heatmaps).all() and np.isnan(result.attention_map).all()


def test_without_attention() -> None:
    result = collect(build_stream(StreamSpec(attention=False))[0])
    assert not result.has_attention
    assert np.isnan(result.patches.attention).all()
    with pytest.raises(ValueError, match="attention"):
        overlay(result, attention=True)


def test_embeddings() -> None:
    result = collect(build_stream(StreamSpec(embeddings=4))[0])
    assert result.patches.embeddings is not None
    assert result.patches.embeddings.shape == (result.patch_count, 4)


def test_prediction_and_default_class() -> None:
    result = collect(build_stream(StreamSpec())[0])
    pred = result.prediction
    assert pred is not None and pred.predicted_class == "positive"
    assert math.isclose(pred.probability, 0.5744, rel_tol=1e-6)
    assert pred.as_dict() == {"negative": pytest.approx(0.4256), "positive": pytest.approx(0.5744)}
    # "positive" is not a patch class: the overlay shows the highest mean probability.
    mean = result.patches.probabilities.mean(axis=0)
    assert result.default_class() == result.class_names[int(np.argmax(mean))]
    with pytest.raises(KeyError):
        result.heatmap("nope")


def _drop(msgs, kind):
    return [m for m in msgs if m.WhichOneof("event") != kind]


def _dup_patch(msgs):
    extra = next(m for m in msgs if m.WhichOneof("event") == "patches")
    return [*msgs[:-1], extra, msgs[-1]]


def _bad_row(msgs):
    out = [pb.AnalyzeSlideResponse() for _ in msgs]
    for o, m in zip(out, msgs, strict=True):
        o.CopyFrom(m)
    p = next(o for o in out if o.WhichOneof("event") == "patches")
    p.patches.row[0] = 99
    return out


def _bad_attention(msgs):
    out = list(msgs)
    out.insert(
        -1, pb.AnalyzeSlideResponse(attention=pb.AttentionChunk(patch_index=[999], attention=[0.5]))
    )
    return out


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m[1:], "not AnalysisStarted"),
        (lambda m: m[:-1], "ended before"),
        (lambda m: [m[0], *m], "twice"),
        (lambda m: [*m, m[1]], "after AnalysisCompleted"),
        (_dup_patch, "patch index twice"),
        (_bad_row, "outside the grid"),
        (_bad_attention, "attention"),
    ],
    ids=[
        "no-started",
        "no-completed",
        "two-started",
        "after-completed",
        "dup-patch",
        "bad-row",
        "bad-attention",
    ],
)
def test_protocol_violations_raise_internal_error(mutate, match) -> None:
    msgs, _ = build_stream(StreamSpec())
    with pytest.raises(InternalError, match=match):
        collect(mutate(msgs))


def test_malformed_patch_results_raise() -> None:
    msg = pb.AnalyzeSlideResponse(patches=pb.PatchResults(patch_index=[0, 1], row=[0], col=[0, 1]))
    with pytest.raises(InternalError, match="row"):
        event_from_proto(msg)
    with pytest.raises(InternalError, match="without an event"):
        event_from_proto(pb.AnalyzeSlideResponse())


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(1, 6),
    n_cols=st.integers(1, 6),
    data=st.data(),
    batch_size=st.integers(1, 7),
)
def test_property_nan_exactly_where_no_patch(n_rows, n_cols, data, batch_size) -> None:
    all_cells = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    cells = data.draw(st.lists(st.sampled_from(all_cells), unique=True, min_size=1))
    spec = StreamSpec(n_rows=n_rows, n_cols=n_cols, cells=cells, batch_size=batch_size)
    msgs, exp = build_stream(spec)
    result = collect(msgs)
    has_patch = np.zeros((n_rows, n_cols), bool)
    has_patch[exp.row, exp.col] = True
    assert np.array_equal(~np.isnan(result.heatmaps).any(axis=0), has_patch)
    assert np.array_equal(~np.isnan(result.attention_map), has_patch)
    assert math.isclose(float(np.nansum(result.attention_map)), 1.0, rel_tol=1e-5)


def test_options_to_proto() -> None:
    msg = AnalysisOptions(target_mpp=0.5, min_tissue_fraction=0.0, edge_mode="drop").to_proto()
    assert msg.target_resolution.WhichOneof("value") == "mpp"
    assert msg.HasField("min_tissue_fraction") and msg.min_tissue_fraction == 0.0
    assert msg.edge_mode == pb.EDGE_MODE_DROP
    assert msg.return_attention and not msg.return_embeddings
    default = AnalysisOptions().to_proto()
    assert not default.HasField("target_resolution")
    assert not default.HasField("min_tissue_fraction") and not default.HasField("mpp_override")
    assert AnalysisOptions(target_level=0).to_proto().target_resolution.level == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_mpp": 0.5, "target_level": 1},
        {"target_mpp": -1.0},
        {"target_mpp": float("nan")},
        {"patch_size_px": 0},
        {"min_tissue_fraction": 1.5},
        {"edge_mode": "wrap"},
        {"target_level": -1},
    ],
    ids=[
        "two-resolutions",
        "negative-mpp",
        "nan-mpp",
        "zero-patch",
        "fraction",
        "edge-mode",
        "level",
    ],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(InvalidOptionsError):
        AnalysisOptions(**kwargs)


def test_partial_result_for_live_rendering() -> None:
    msgs, exp = build_stream(StreamSpec(batch_size=4))
    collector = ResultCollector()
    with pytest.raises(InternalError, match="before AnalysisStarted"):
        collector.result(partial=True)
    collector.add(event_from_proto(msgs[0]))
    collector.add(event_from_proto(msgs[1]))  # first batch of 4 patches
    partial = collector.result(partial=True)
    assert partial.outcome == "running" and partial.prediction is None
    assert partial.patch_count == 4
    assert int((~np.isnan(partial.heatmaps[0])).sum()) == 4
    assert overlay(partial, legend=False).shape == exp.thumbnail_rgb.shape
    with pytest.raises(InternalError, match="before AnalysisCompleted"):
        collector.result()

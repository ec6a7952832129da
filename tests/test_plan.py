"""The epoch plan on an index alone: an index.parquet whose shards do not exist, so no byte of video is read."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import LoaderConfig
from pipelines.plan import EpochPlan, buffer_order
from pipelines.sampling import eval_window, frame_indices, scale_jitter_window, uniform_indices
from pipelines.source import ShardIndex, shuffled

ROWS = 48     # in 6 shards of 8


def index_without_videos(folder) -> str:
    """A split folder whose index.parquet lists 48 videos of 40..87 frames at 340x256 or 256x456 in 6 shards
    that were never written."""
    folder.mkdir()
    rows = np.arange(ROWS)
    pq.write_table(pa.table({
        "key": [f"video{r:03d}" for r in rows], "label": rows % 4, "label_name": [f"class{r % 4}" for r in rows],
        "shard": [f"train/shard-{r // 8:06d}.tar" for r in rows], "offset": 512 + (rows % 8) * 100_000,
        "size": np.full(ROWS, 99_000), "ext": ["webm"] * ROWS, "num_frames": 40 + rows, "fps": np.full(ROWS, 30.0),
        "width": np.where(rows % 2, 340, 256), "height": np.where(rows % 2, 256, 456), "codec": ["vp9"] * ROWS,
        "sha256": ["0" * 64] * ROWS}), folder / "index.parquet")
    return str(folder)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> ShardIndex:
    return ShardIndex(index_without_videos(tmp_path_factory.mktemp("plan") / "train"))


def plan(index, epoch=0, **options) -> EpochPlan:
    return EpochPlan(index, LoaderConfig.of(**{"batch_size": 4, "num_frames": 8, "crop_size": 112,
                                               "short_side": (128, 160), **options}), epoch)


def batches(p: EpochPlan) -> list:
    return [p.batch(k) for k in range(len(p))]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip((a.rows, a.clip, a.crop, a.valid, a.frames, a.roi, a.mirror),
                                                   (b.rows, b.clip, b.crop, b.valid, b.frames, b.roi, b.mirror)))


def test_a_seed_and_an_epoch_fix_the_plan(index):
    first, again = batches(plan(index, seed=3)), batches(plan(index, seed=3))
    assert len(first) == ROWS // 4 and all(same(a, b) for a, b in zip(first, again))
    other = batches(plan(index, seed=3, epoch=1))
    rows = [np.concatenate([b.rows for b in bs]) for bs in (first, other)]
    assert not np.array_equal(*rows) and not any(same(a, b) for a, b in zip(first, other))
    assert sorted(rows[0].tolist()) == sorted(rows[1].tolist()) == list(range(ROWS))
    assert not np.array_equal(plan(index, seed=4).order, plan(index, seed=3).order)


def test_training_ranks_get_equal_batches_of_disjoint_rows(index):
    ranks = [plan(index, world_size=3, rank=r, seed=1) for r in range(3)]
    assert [len(p) for p in ranks] == [ROWS // 3 // 4] * 3
    rows = [set(np.concatenate([b.rows for b in batches(p)]).tolist()) for p in ranks]
    assert [len(r) for r in rows] == [len(ranks[0]) * 4] * 3 and len(set.union(*rows)) == 3 * len(ranks[0]) * 4
    assert all(b.valid.all() for p in ranks for b in batches(p))


def test_eval_ranks_cover_every_view_of_every_row_once_and_flag_the_padding(index):
    ranks = [plan(index, mode="eval", num_clips=2, num_crops=3, world_size=5, rank=r) for r in range(5)]
    assert {len(p) for p in ranks} == {15}                                 # 9 or 10 rows each: equal batches
    views, padding = [], 0
    for p in ranks:
        for b in batches(p):
            views += list(zip(b.rows[b.valid].tolist(), b.clip[b.valid].tolist(), b.crop[b.valid].tolist()))
            padding += int((~b.valid).sum())
    assert sorted(views) == [(r, c, k) for r in range(ROWS) for c in range(2) for k in range(3)]
    assert padding == 5 * 15 * 4 - ROWS * 6


def test_a_resumed_epoch_starts_at_its_batch_with_the_same_views_and_reads_only_what_it_needs(index):
    p = plan(index, seed=2, epoch=5)
    after = np.concatenate([p.batch(k).rows for k in range(7, len(p))])
    assert np.array_equal(p.rows_from(7), after)                           # the order the views come out
    reads = p.reads_from(7)
    assert sorted(reads.tolist()) == sorted(after.tolist())
    assert np.array_equal(reads, p.reads[np.isin(p.reads, after)])          # read shard by shard, as the epoch reads
    assert same(EpochPlan(index, p.config, 5).batch(9), p.batch(9))


def test_eval_views_read_segment_centres_per_clip_and_three_crops_along_the_long_side(index):
    p = plan(index, mode="eval", num_clips=2, num_crops=3, crop_size=112, test_short_side=112)
    views = p.views_of(np.array([7]))                                     # 47 frames of 340x256
    assert views.clip.tolist() == [0, 0, 0, 1, 1, 1] and views.crop.tolist() == [0, 1, 2] * 2
    for frames, clip in zip(views.frames, views.clip.tolist()):
        assert np.array_equal(frames, uniform_indices(47, 8, clip, 2))
    windows = [tuple(w) for w in views.roi[:3].tolist()]
    assert windows == [tuple(np.float32(eval_window(256, 340, 112, 112, k, 3))) for k in range(3)]
    assert windows[0][1] == 0 and windows[2][3] == 340 and not views.mirror.any()


def test_default_training_views_follow_the_sampling_rules(index):
    views = plan(index, sampling="uniform", train_crop="scale_jitter").views_of(np.arange(48))
    n = index["num_frames"][views.rows][:, None]
    segment = np.floor(n / 8 * np.arange(9)).astype(int)
    assert ((segment[:, :8] <= views.frames) & (views.frames <= segment[:, 1:])).all()       # one in each segment
    side = views.roi[:, 2] - views.roi[:, 0]
    short = np.minimum(index["height"], index["width"])[views.rows]
    assert np.allclose(side, views.roi[:, 3] - views.roi[:, 1])                       # squares
    assert (112 * short / side >= 128 - 1e-3).all() and (112 * short / side <= 160 + 1e-3).all()
    assert 10 < views.mirror.sum() < 38
    dense = plan(index, sampling="dense", stride=2).views_of(np.arange(48))
    assert (np.diff(dense.frames, axis=1) == 2).all() and (dense.frames[:, -1] < n[:, 0]).all()


def test_a_rows_draws_depend_on_the_seed_epoch_and_row_only(index):
    """Not on the rank, nor on where the row lands in the epoch: a resume or another world size moves no crop."""
    alone = plan(index, seed=7)
    for rank in range(2):
        part = plan(index, seed=7, world_size=2, rank=rank)
        rows = part.order
        assert same(alone.views_of(rows), part.views_of(rows))


def test_the_authors_protocols_draw_each_view_from_the_rows_own_generator(index):
    p = plan(index, protocol="ibm", train_crop="scale_jitter", seed=5, epoch=2)
    views = p.views_of(np.array([3, 8]))
    for i, row in enumerate([3, 8]):
        rng = np.random.default_rng([5, 2, row])
        assert np.array_equal(views.frames[i], frame_indices("uniform", 40 + row, 8, 2, rng=rng, protocol="ibm"))
        window = scale_jitter_window(int(index["height"][row]), int(index["width"][row]), 112, (128, 160), rng, "ibm")
        assert np.array_equal(views.roi[i], np.float32(window)) and views.mirror[i] == (rng.random() < 0.5)


def test_a_rows_frames_are_known_before_it_is_read_view_by_view(index):
    p = plan(index, mode="eval", num_clips=3, sampling="dense", stride=2)
    for row, frames in zip((0, 30), p.row_frames(np.array([0, 30]))):
        assert frames.shape == (3, 8) and np.array_equal(frames, p.views_of(np.array([row])).frames)


def test_the_shuffle_buffer_keeps_the_order_of_the_streaming_shuffle(index):
    rows = np.arange(300) * 7
    streamed = list(shuffled(rows.tolist(), 64, np.random.default_rng([1, 2, 3])))
    assert buffer_order(rows, 64, np.random.default_rng([1, 2, 3])).tolist() == streamed
    assert sorted(buffer_order(rows[:10], 64, np.random.default_rng(0)).tolist()) == rows[:10].tolist()

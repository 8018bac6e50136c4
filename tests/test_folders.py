"""VideoFolder and BucketBatchSampler: captions, frame sampling, shapes, broken files, buckets."""

import json
import warnings

import pytest
import torch

from dfm.data import BucketBatchSampler, VideoFolder, collate
from dfm.data.buckets import nearest_bucket
from dfm.video import write_video

LEVELS = torch.linspace(-0.8, 0.8, 10)  # frame i is a flat grey at LEVELS[i]: its mean tells which frame it was


def ramp(frames, height, width):
    """[3, F, H, W]: frame i is flat grey LEVELS[i] with a white bar in the left quarter (to check the crop)."""
    video = LEVELS[:frames].view(1, frames, 1, 1).expand(3, frames, height, width).clone()
    video[:, :, :, : width // 4] = 1.0
    return video


def frame_numbers(video):
    """Recover source frame numbers from a decoded [3, F, H, W] clip (using its right half, away from the bar)."""
    means = video[:, :, :, video.shape[3] // 2 :].mean(dim=(0, 2, 3))  # [F]
    return (means[:, None] - LEVELS[None]).abs().argmin(dim=1).tolist()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "a.mp4", ramp(8, 32, 48), fps=8)  # 8 frames, 32x48, 8 fps
    write_video(root / "b.gif", ramp(10, 24, 24), fps=10)  # 10 frames, 24x24, 10 fps
    write_video(root / "c", ramp(6, 16, 32))  # png sequence: 6 frames, 16x32
    (root / "a.txt").write_text("a grey ramp\n")
    (root / "b.txt").write_text("a gif ramp")
    (root / "c.txt").write_text("png frames")
    (root / "broken.mp4").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    (root / "empty.webm").write_bytes(b"")
    (root / ".a.unfinished.tmp.mp4").write_bytes(b"half a file")  # hidden: never listed
    (root / "notes.md").write_text("not a video")
    return root


def load(root, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = VideoFolder(root, **options)
    return data, [str(w.message) for w in caught]


def test_sidecar_captions_and_skipped_files(folder):
    data, messages = load(folder, num_frames=4, size=(16, 16), temporal_crop="start")
    assert [p.path.name for p in data.clips] == ["a.mp4", "b.gif", "c"]
    assert [p.caption for p in data.clips] == ["a grey ramp", "a gif ramp", "png frames"]
    assert sorted(path.split("/")[-1] for path, _ in data.skipped) == ["broken.mp4", "empty.webm"]
    # one summary warning (issue 13: it was one per file): clips used, skipped by reason, the files named
    (message,) = messages
    assert message.startswith(f"VideoFolder {folder}: 3 clips used, 2 skipped (2 unreadable): ")
    assert "broken.mp4 (unreadable" in message and "empty.webm (unreadable" in message
    for i in range(len(data)):
        item = data[i]
        assert item["video"].shape == (3, 4, 16, 16)
        assert item["video"].min() >= -1 and item["video"].max() <= 1
        assert frame_numbers(item["video"]) == [0, 1, 2, 3]
    assert data[1]["caption"] == "a gif ramp"


def test_meta_json_captions_and_frame_ranges(folder):
    meta = [
        {"file_name": "a.mp4", "caption": "middle of a", "start_frame": 2, "end_frame": 7},
        {"file_name": "c", "caption": "all of c"},
        {"file_name": "missing.mp4", "caption": "gone"},
        {"file_name": "broken.mp4", "caption": "corrupt"},
    ]
    (folder / "meta.json").write_text(json.dumps(meta))
    data, _ = load(folder, num_frames=5, size=None, temporal_crop="start")
    assert [c.caption for c in data.clips] == ["middle of a", "all of c"]
    assert len(data.skipped) == 2
    assert frame_numbers(data[0]["video"]) == [2, 3, 4, 5, 6]  # stays inside [start_frame, end_frame)
    assert data[0]["video"].shape == (3, 5, 32, 48) and data[1]["video"].shape == (3, 5, 16, 32)  # size=None keeps size
    random_starts = {frame_numbers(load(folder, num_frames=3, size=None, seed=s)[0][0]["video"])[0] for s in range(12)}
    assert random_starts <= {2, 3, 4} and len(random_starts) > 1  # random crops stay in range too
    sidecar, _ = load(folder, num_frames=5, size=None, meta=None)
    assert [c.caption for c in sidecar.clips] == ["a grey ramp", "a gif ramp", "png frames"]


def test_stride_and_fps_sampling(folder):
    strided, _ = load(folder, num_frames=4, size=(16, 16), stride=2, temporal_crop="start")
    assert frame_numbers(strided[1]["video"]) == [0, 2, 4, 6]  # b.gif, 10 frames
    assert [c.path.name for c in strided.clips] == ["a.mp4", "b.gif"]  # c (6 frames) cannot give 4 at stride 2
    assert any("too short" in reason for _, reason in strided.skipped)
    by_fps, _ = load(folder, num_frames=3, size=(16, 16), fps=5, temporal_crop="start")
    assert frame_numbers(by_fps[1]["video"]) == [0, 2, 4]  # 10 fps gif -> 5 fps: every second frame
    assert by_fps[1]["fps"] == pytest.approx(5.0)
    centred, _ = load(folder, num_frames=4, size=(16, 16), stride=2, temporal_crop="center")
    assert frame_numbers(centred[0]["video"]) == [0, 2, 4, 6]  # a.mp4: 8 frames, no slack
    assert centred.frame_indices(1) == [1, 3, 5, 7]  # b.gif: 10 frames, slack 3 -> offset 1
    with pytest.raises(ValueError, match="stride or fps"):
        VideoFolder(folder, stride=2, fps=4)


def test_resize_and_centre_crop(folder):
    data, _ = load(folder, num_frames=2, size=(8, 12), temporal_crop="start")
    for i in range(len(data)):
        assert data[i]["video"].shape == (3, 2, 8, 12)
    # a.mp4 is 32x48: covering 8x12 needs no crop, so the white bar (left quarter) survives at the left edge
    assert data[0]["video"][:, :, :, 0].min() > 0.9
    # the square gif is only scaled (24x24 -> 10x10): its bar (first 6 of 24 columns) becomes the first 2.5 columns
    square, _ = load(folder, num_frames=2, size=(10, 10), temporal_crop="start")
    gif = square[1]["video"]
    assert gif[:, :, :, 0].min() > 0.9 and gif[:, :, :, -1].max() < 0.0


def test_aspect_and_length_buckets(folder):
    sizes = [(16, 16), (16, 32)]
    data, _ = load(folder, num_frames=[4, 8], size=sizes, temporal_crop="start")
    assert data.bucket_keys == [(8, 16, 32), (8, 16, 16), (4, 16, 32)]  # a: 32x48 wide; b: square; c: 6 frames only
    for i, key in enumerate(data.bucket_keys):
        assert tuple(data[i]["video"].shape[1:]) == key
    assert nearest_bucket(100, 200, sizes) == (16, 32) and nearest_bucket(90, 80, sizes) == (16, 16)


def test_bucket_sampler_batches_share_a_shape():
    keys = [(4, 16, 16)] * 7 + [(4, 16, 32)] * 5 + [(8, 16, 16)] * 3
    sampler = BucketBatchSampler(keys, batch_size=2, seed=1)
    batches = list(sampler)
    assert all(len({keys[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for b in batches for i in b) == list(range(15))  # every item once
    assert len(batches) == len(sampler) == 4 + 3 + 2
    assert list(BucketBatchSampler(keys, batch_size=2, seed=1)) == batches  # deterministic for a seed
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch
    dropped = list(BucketBatchSampler(keys, batch_size=2, drop_last=True))
    assert all(len(b) == 2 for b in dropped) and len(dropped) == 3 + 2 + 1


def test_bucket_sampler_shards_across_ranks():
    keys = [0] * 9 + [1] * 4
    world = 3
    shards = [list(BucketBatchSampler(keys, batch_size=2, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps on every rank
    assert len(shards[0]) == len(BucketBatchSampler(keys, batch_size=2, rank=0, world_size=world))
    every = [i for s in shards for b in s for i in b]
    assert set(every) == set(range(13))  # nothing lost; padding only repeats
    assert len(every) - 13 <= 2 * world  # at most world_size - 1 extra batches
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(keys, batch_size=2, rank=3, world_size=3)


def test_loader_with_buckets_gives_same_shape_batches(folder):
    data, _ = load(folder, num_frames=[2, 4], size=[(8, 8), (8, 16)])
    loader = torch.utils.data.DataLoader(data, batch_sampler=BucketBatchSampler(data, batch_size=2), collate_fn=collate)
    shapes = [tuple(batch["video"].shape[1:]) for batch in loader]  # stacking would fail on mixed shapes
    assert sorted(shapes) == sorted({(3,) + k for k in data.bucket_keys})


def test_file_failing_at_load_time_is_replaced_and_counted(folder):
    data, _ = load(folder, num_frames=4, size=(16, 16), temporal_crop="start")
    assert len(data.skipped) == 2
    (folder / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video any more")
    with pytest.warns(UserWarning, match="a.mp4"):
        item = data[0]
    assert item["path"].endswith("b.gif") and item["video"].shape == (3, 4, 16, 16)  # next item with the same shape
    assert len(data.skipped) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not retried or warned about again
        assert data[0]["path"].endswith("b.gif")
    (folder / "b.gif").write_bytes(b"")
    for png in (folder / "c").iterdir():
        png.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every file"):
        data[0]


# ------------------------------------------------------------------ issue 13: one summary, a broken meta.json


def test_many_broken_files_give_one_summary_line(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "good.mp4", ramp(8, 16, 16), fps=8)
    write_video(root / "short.mp4", ramp(2, 16, 16), fps=8)
    for i in range(7):
        (root / f"bad{i}.mp4").write_bytes(b"\x00" * 64)
    (root / "latin1.mp4").write_bytes((root / "good.mp4").read_bytes())
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # a caption that is not UTF-8: skipped, named
    data, messages = load(root, num_frames=4, size=(16, 16))
    assert [c.path.name for c in data.clips] == ["good.mp4"] and len(data.skipped) == 9
    (message,) = messages
    assert len(message.splitlines()) == 1
    assert "1 clips used, 9 skipped (" in message
    assert all(part in message for part in ("7 unreadable,", "1 unreadable caption", "1 too short"))
    assert "bad0.mp4 (unreadable" in message and message.endswith("; and 4 more (dataset.skipped lists them)")


def test_a_broken_meta_json_is_one_user_error(tmp_path):
    from dfm.data.folders import VideoFolderError
    from dfm.errors import UserError

    root = tmp_path / "videos"
    write_video(root / "a.mp4", ramp(8, 16, 16), fps=8)
    for text, match in [(b"[{\"file_name\": \"a.mp4\",", "meta.json is not readable JSON .*JSONDecodeError"),
                        (b"\xff\xfe[]", "meta.json is not readable JSON .*UnicodeDecodeError"),
                        (b"{\"a.mp4\": \"x\"}", "must hold a list .* got dict")]:
        (root / "meta.json").write_bytes(text)
        with pytest.raises(VideoFolderError, match=match) as info:
            VideoFolder(root, num_frames=4, size=(16, 16))
        assert isinstance(info.value, UserError) and len(str(info.value).splitlines()) == 1
    (root / "meta.json").write_text(json.dumps([{"file_name": "a.mp4", "caption": "x", "start_frame": "one"}]))
    data, messages = load(root, num_frames=4, size=(16, 16))
    assert len(data) == 0 and "bad start_frame" in messages[0]

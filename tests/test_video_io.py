"""dfm.video: write/read round trips, frame sampling, resize/crop, atomic writes (dfm.io), contact sheets."""

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import dfm.video as video_module
from dfm.io import atomic_path, write_text_atomic, written_file_mode
from dfm.video import (
    VideoInfo,
    frame_indices,
    probe_video,
    read_video,
    resize_center_crop,
    to_uint8_frames,
    write_contact_sheet,
    write_video,
)


def smooth_clip(frames=6, height=32, width=48):
    """A smooth moving colour gradient [3, F, H, W] in [-1, 1] (easy for a codec, different every frame)."""
    f = torch.arange(frames).view(frames, 1, 1).float()
    y = torch.linspace(-1, 1, height).view(1, height, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, width)
    red = torch.sin(2 * x + 0.5 * f) * 0.8 + 0 * y
    green = torch.cos(2 * y - 0.4 * f) * 0.8 + 0 * x
    blue = (x * y * 0.8).expand(frames, height, width)
    return torch.stack([red, green, blue])  # [3, F, H, W]


def flat_colour_clip(frames=5, height=16, width=24):
    """Few flat colours: a GIF palette holds them exactly."""
    video = -torch.ones(3, frames, height, width)
    for i in range(frames):
        video[0, i, :, 2 * i : 2 * i + 6] = 1.0  # a red bar moving right
        video[2, i, 8:, :] = 0.0  # a grey-blue lower half
    return video


def test_mp4_round_trip_is_close(tmp_path):
    video = smooth_clip()
    path = write_video(tmp_path / "clip.mp4", video, fps=8)
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (6, 32, 48)
    assert info.fps == pytest.approx(8.0)
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == torch.float32
    assert (back - video).abs().mean() < 0.03  # codec tolerance (yuv420p, crf 12)
    # frames stay in order: each decoded frame is nearest to its own source frame
    dist = ((back[:, :, None] - video[:, None]) ** 2).mean(dim=(0, 3, 4))  # [F, F]
    assert torch.equal(dist.argmin(dim=1), torch.arange(6))


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    video = flat_colour_clip()
    path = write_video(tmp_path / "clip.gif", video, fps=10)
    back = read_video(path)
    assert back.shape == video.shape
    np.testing.assert_array_equal(to_uint8_frames(back), to_uint8_frames(video))
    assert probe_video(path).fps == pytest.approx(10.0)
    assert probe_video(write_video(tmp_path / "slow.gif", video, fps=4)).fps == pytest.approx(4.0)


def test_png_sequence_round_trip_is_exact(tmp_path):
    video = smooth_clip(frames=4)
    folder = write_video(tmp_path / "seq", video)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    back = read_video(folder)
    np.testing.assert_array_equal(to_uint8_frames(back), to_uint8_frames(video))


def test_uint8_fhwc_input_is_accepted(tmp_path):
    frames = to_uint8_frames(flat_colour_clip())  # [F, H, W, 3] uint8
    back = read_video(write_video(tmp_path / "u8.gif", frames, fps=5))
    np.testing.assert_array_equal(to_uint8_frames(back), frames)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", smooth_clip(height=31), fps=8)
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        write_video(tmp_path / "bad.mp4", torch.zeros(2, 3, 8, 8), fps=8)
    with pytest.raises(ValueError, match="cannot write"):
        write_video(tmp_path / "clip.avi", smooth_clip(), fps=8)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    assert not list(tmp_path.iterdir())  # failed writes leave nothing behind


def test_odd_size_pads_when_asked(tmp_path):
    back = read_video(write_video(tmp_path / "odd.mp4", smooth_clip(height=31, width=47), fps=8, pad_odd=True))
    assert back.shape == (3, 6, 32, 48)


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.mp4"
    write_video(target, smooth_clip(), fps=8)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video_module, "_write_mp4", crash)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(target, smooth_clip(frames=3), fps=8)
    assert target.read_bytes() == before  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]  # no temp file left


def test_frame_sampling_by_stride_and_fps(tmp_path):
    assert frame_indices(10, 4, start=1, stride=2) == [1, 3, 5, 7]
    assert frame_indices(100, 3, fps=10, source_fps=30) == [0, 3, 6]
    assert frame_indices(7) == list(range(7))
    with pytest.raises(ValueError, match="has 10 frames"):
        frame_indices(10, 6, stride=2)
    with pytest.raises(ValueError, match="either stride or fps"):
        frame_indices(10, 2, stride=2, fps=4, source_fps=8)

    video = smooth_clip(frames=8)
    folder = write_video(tmp_path / "seq", video)
    np.testing.assert_array_equal(
        to_uint8_frames(read_video(folder, 3, start=1, stride=3)), to_uint8_frames(video[:, [1, 4, 7]])
    )
    path = write_video(tmp_path / "c.gif", flat_colour_clip(frames=8, height=16, width=32), fps=10)
    halved = read_video(path, 4, fps=5)  # 10 fps source -> every second frame
    np.testing.assert_array_equal(to_uint8_frames(halved), to_uint8_frames(read_video(path)[:, ::2]))


def test_resize_center_crop_shapes_and_centre():
    video = torch.zeros(3, 2, 40, 80)
    video[:, :, :, 20:60] = 1.0  # the centre half is bright
    out = resize_center_crop(video, (20, 20))  # 40x80 -> 20x40 -> crop the middle 20 columns
    assert out.shape == (3, 2, 20, 20)
    assert out[..., 1:-1].min() > 0.99 and out.min() > 0.5  # only the bright centre survives (edges: antialias)
    assert resize_center_crop(torch.zeros(3, 1, 10, 10), (24, 16)).shape == (3, 1, 24, 16)


def test_contact_sheet_layout(tmp_path):
    videos = torch.stack([smooth_clip(frames=6, height=16, width=16), -torch.ones(3, 6, 16, 16)])
    path = write_contact_sheet(tmp_path / "sheet.png", videos, ncols=3, pad=2)
    image = np.asarray(Image.open(path))
    assert image.shape == (2 + 2 * (16 + 2), 2 + 3 * (16 + 2), 3)
    assert (image[20:36, 2:18] == 0).all()  # second row, first cell: the all-black video
    labelled = np.asarray(Image.open(write_contact_sheet(tmp_path / "l.png", videos, labels=["a digit", "b"])))
    assert labelled.shape[0] > image.shape[0] and labelled.shape[1] == 2 + 6 * 18
    with pytest.raises(ValueError, match="labels"):
        write_contact_sheet(tmp_path / "x.png", videos, labels=["one"])


def test_webm_without_frame_count_is_probed_and_read(tmp_path):
    """WebM headers carry no frame count: probe_video counts packets instead (no decoding)."""
    import av

    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(7):
            frame = np.full((24, 32, 3), 30 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the case this test is about
    assert probe_video(path) == VideoInfo(num_frames=7, fps=12.0, height=24, width=32)
    levels = read_video(path, 3, stride=3)[0, :, 12, 16]  # frames 0, 3, 6
    assert torch.allclose(levels, torch.tensor([0, 90, 180]) / 127.5 - 1, atol=0.05)


def test_written_files_get_the_usual_mode(tmp_path):
    path = write_video(tmp_path / "clip.mp4", torch.zeros(3, 2, 8, 8))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600


def test_atomic_text_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    assert write_text_atomic(target, "first\n") == target  # the folder is created
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".txt" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first\n"  # old file untouched
    assert [p.name for p in target.parent.iterdir()] == ["notes.txt"]  # no temp file left
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n"
    assert stat.S_IMODE(target.stat().st_mode) == written_file_mode()

"""`dfm preprocess` and LatentDataset: latents and text rows round-trip exactly, shards resume after a crash or damage,
broken videos are skipped and counted, settings are never mixed, errors are one line."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

import dfm.io
from dfm.data import LatentDataset, MovingDigits, VideoFolder, collate
from dfm.data.latents import LatentDataError
from dfm.errors import UserError
from dfm.preprocess import PreprocessError, preprocess
from dfm.text import FrozenTextEncoder, SmallTextConfig, SmallTextEncoder, WordTokenizer, load_text_encoder
from dfm.vae import IdentityVAE
from dfm.video import write_video


class PoolVAE(torch.nn.Module):
    """A stand-in latent VAE with the dfm interface: 2x2 spatial average pooling, 1 + 2n frames (time stride 2)."""

    channels, temporal_factor, spatial_factor = 3, 2, 2

    def latent_shape(self, frames, height, width):
        if (frames - 1) % 2 or height % 2 or width % 2:
            raise UserError(f"PoolVAE encodes 1 + 2n frames of even size, got {frames}x{height}x{width}")
        return (3, 1 + (frames - 1) // 2, height // 2, width // 2)

    def encode(self, video):  # [B, 3, F, H, W] -> [B, 3, 1 + (F-1)/2, H/2, W/2]
        return F.avg_pool3d(video[:, :, ::2], (1, 2, 2))


class FullRowEncoder(FrozenTextEncoder):
    """A frozen encoder whose padded positions are not zero (as T5 / CLIP) and that has a pooled vector."""

    def __init__(self, length=12, dim=4):
        super().__init__()
        self.dim, self.max_length, self.pad_to, self.zero_padding = dim, length, length, False
        self.calls = 0

    def _encode(self, prompts):
        self.calls += 1
        n = torch.tensor([min(len(p.split()) + 1, self.max_length) for p in prompts])  # real tokens
        mask = torch.arange(self.max_length)[None] < n[:, None]  # [B, L]
        emb = torch.stack([torch.full((self.max_length, self.dim), float(sum(map(ord, p)) % 97)) for p in prompts])
        emb = emb + torch.arange(self.max_length)[None, :, None]  # [B, L, D], nonzero at padding too
        return emb, mask, emb[:, 0, :2] * 2

    def describe(self):
        return {"type": "full_rows", "dim": self.dim, "max_length": self.max_length}


def digits(length=10):
    return MovingDigits(num_frames=5, size=16, length=length, seed=3)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preprocess_text")
    torch.manual_seed(0)
    captions = [digits(40)[i]["caption"] for i in range(40)]
    SmallTextEncoder(WordTokenizer.from_captions(captions), SmallTextConfig(dim=16, layers=1, heads=2,
                                                                             max_length=12)).save_pretrained(folder)
    return folder


def run(dataset, out, vae=None, text=None, **options):
    options = {"shard_size": 4, "batch_size": 3, "verbose": False, **options}
    return preprocess(dataset, vae or IdentityVAE(), text, out, **options)


# ---------------------------------------------------------------------------------------------- round trips


def test_digits_round_trip_with_small_encoder(small_folder, tmp_path):
    data, enc = digits(10), load_text_encoder(small_folder)
    summary = run(data, tmp_path / "out", text=enc)
    assert summary | {"seconds": 0} == {"out": str(tmp_path / "out"), "shards": 3, "written": 3, "reused": 0,
                                        "samples": 10, "failed": 0, "skipped": 0, "seconds": 0}
    latents = LatentDataset(tmp_path / "out")
    assert len(latents) == 10 and latents.context_length == 12 and latents.text_encoder["type"] == "small"
    assert latents.bucket_keys == [(3, 5, 16, 16)] * 10
    fresh = load_text_encoder(small_folder, cache_bytes=0)
    for i in (0, 5, 9):
        item, source = latents[i], data[i]
        assert torch.equal(item["latents"], source["video"]) and item["caption"] == source["caption"]
        emb, mask = fresh.encode([source["caption"]])  # [1, l, D]: padded to the prompt's own length
        assert item["context"].shape == (12, 16) and item["context_mask"].shape == (12,)
        l = mask.shape[1]
        torch.testing.assert_close(item["context"][:l], emb[0], rtol=0, atol=1e-6)
        assert torch.equal(item["context_mask"][:l], mask[0]) and not item["context_mask"][l:].any()
        assert item["context"][l:].abs().max() == 0
    batch = collate([latents[i] for i in range(4)])
    assert batch["latents"].shape == (4, 3, 5, 16, 16) and batch["context"].shape == (4, 12, 16)


def test_latent_vae_and_full_rows_with_pooled(tmp_path):
    data, enc = digits(5), FullRowEncoder()
    run(data, tmp_path / "out", vae=PoolVAE(), text=enc, shard_size=8)
    latents = LatentDataset(tmp_path / "out")
    assert latents.bucket_keys[0] == (3, 3, 8, 8) and latents.vae["class"] == "PoolVAE"
    captions = [data[i]["caption"] for i in range(5)]
    emb, mask = enc.encode(captions)
    pooled = enc.encode_pooled(captions)
    for i in range(5):
        item = latents[i]
        assert torch.equal(item["latents"], PoolVAE().encode(data[i]["video"][None])[0])
        assert torch.equal(item["context"], emb[i]) and torch.equal(item["context_mask"], mask[i])
        assert torch.equal(item["pooled"], pooled[i])
        assert item["context"][~item["context_mask"]].abs().min() > 0  # padded positions kept as the model gave them


def test_captions_only_and_repeated_captions_hit_the_cache(tmp_path):
    data = MovingDigits(num_frames=3, size=8, digit_size=4, length=12, directions=("up",), seed=0)
    enc = FullRowEncoder()
    run(data, tmp_path / "with", text=enc, shard_size=12, batch_size=12)
    distinct = len({data[i]["caption"] for i in range(12)})
    assert enc.cache_info()["misses"] == distinct < 12 and enc.calls == 1
    run(data, tmp_path / "none", text=None)
    item = LatentDataset(tmp_path / "none")[3]
    assert set(item) == {"latents", "caption", "id"} and item["caption"] == data[3]["caption"]


def test_unrepresentable_shape_fails_before_writing(tmp_path):
    data = MovingDigits(num_frames=4, size=16, length=3)  # 4 frames: PoolVAE needs 1 + 2n
    with pytest.raises(UserError, match="1 \\+ 2n"):
        run(data, tmp_path / "out", vae=PoolVAE())
    assert not list((tmp_path / "out").glob("*"))  # no shard, and no preprocess.json that would refuse a fix
    assert run(MovingDigits(num_frames=5, size=16, length=3), tmp_path / "out", vae=PoolVAE())["samples"] == 3


# ---------------------------------------------------------------------------------------------- resuming


def test_resume_skips_complete_shards_and_rewrites_damaged_ones(tmp_path):
    data, out = digits(10), tmp_path / "out"
    run(data, out)
    shards = sorted(out.glob("shard_*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert run(data, out)["reused"] == 3 and [p.stat().st_mtime_ns for p in shards] == stamps

    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="rewriting .*shard_00002"):
        summary = run(data, out)
    assert (summary["reused"], summary["written"], summary["samples"]) == (1, 2, 10)
    assert shards[0].stat().st_mtime_ns == stamps[0]
    latents = LatentDataset(out)
    assert all(torch.equal(latents[i]["latents"], data[i]["video"]) for i in (4, 9))


def test_interrupted_run_leaves_complete_shards_and_resumes(tmp_path):
    data, out = digits(10), tmp_path / "out"
    vae, calls = IdentityVAE(), []

    def dies_in_second_shard(video):
        calls.append(1)
        if len(calls) == 3:  # shard 0 takes two VAE calls (batch 3 of 4 items)
            raise KeyboardInterrupt
        return video

    vae.encode = dies_in_second_shard
    with pytest.raises(KeyboardInterrupt):
        run(data, out, vae=vae)
    assert [p.name for p in out.glob("shard_*")] == ["shard_00000.safetensors"]  # no partial shard 1
    assert not [p for p in out.iterdir() if "tmp" in p.name]  # the temporary file was removed
    assert len(LatentDataset(out)) == 4  # the index lists what is complete
    summary = run(data, out)
    assert (summary["reused"], summary["written"]) == (1, 2) and len(LatentDataset(out)) == 10


def test_a_write_that_fails_midway_leaves_no_shard(tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # the start of a header, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dfm.io, "_save_file", disk_full)  # under dfm.io.save_safetensors
    with pytest.raises(OSError, match="No space"):
        run(digits(6), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preprocess.json"]
    monkeypatch.undo()
    assert run(digits(6), tmp_path / "out")["written"] == 2


def test_other_settings_are_refused(tmp_path):
    run(digits(10), tmp_path / "out")
    with pytest.raises(PreprocessError, match="num_items") as info:
        run(digits(12), tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(PreprocessError, match="vae.class"):
        run(digits(10), tmp_path / "out", vae=PoolVAE())
    with pytest.raises(PreprocessError, match="shard_size"):
        run(digits(10), tmp_path / "out", shard_size=5)


# ---------------------------------------------------------------------------------------------- broken videos


def test_broken_videos_are_skipped_counted_and_never_replaced(tmp_path):
    root = tmp_path / "videos"
    for name, level in (("a", -0.5), ("b", 0.0), ("c", 0.5)):
        frames = level + 0.1 * torch.arange(5.0).view(1, 5, 1, 1)  # distinct frames (a gif merges repeats)
        write_video(root / f"{name}.gif", frames.expand(3, 5, 16, 16), fps=8)
        (root / f"{name}.txt").write_text(f"clip {name}")
    (root / "broken.mp4").write_bytes(b"\x00" * 64)  # unreadable header: left out when scanning
    with pytest.warns(UserWarning, match="broken.mp4"):
        data = VideoFolder(root, num_frames=5, size=(16, 16), temporal_crop="start")
    expected = data.load(2)["video"]
    (root / "b.gif").write_bytes(b"GIF89a broken later")  # passes the scan, fails to decode
    with pytest.warns(UserWarning, match="skipping item 1 .*b.gif"):
        summary = run(data, tmp_path / "out", shard_size=2)
    assert (summary["samples"], summary["failed"], summary["skipped"]) == (2, 1, 1)
    latents = LatentDataset(tmp_path / "out")
    assert [latents[i]["caption"] for i in range(2)] == ["clip a", "clip c"] and latents.ids == [0, 2]
    assert torch.equal(latents[1]["latents"], expected)  # c itself
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [f["source"].endswith("b.gif") for f in index["failed"]] == [True]
    assert index["skipped"][0]["source"].endswith("broken.mp4")


# ---------------------------------------------------------------------------------------------- LatentDataset


def test_latent_dataset_errors_are_one_line(tmp_path):
    def fails(match):
        with pytest.raises(LatentDataError, match=match) as info:
            LatentDataset(out)[0]
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)

    out = tmp_path / "out"
    fails("not found")
    run(digits(6), out)
    index = (out / "index.json").read_text()
    (out / "index.json").write_text(index[:50])
    fails("index.json is corrupt")
    (out / "index.json").write_text(json.dumps({"format": "other", "samples": {}}))
    fails("corrupt")
    (out / "index.json").unlink()
    fails("no index.json")
    (out / "index.json").write_text(index)
    (out / "shard_00001.safetensors").rename(out / "moved")
    fails("lacks 1 shard")
    (out / "moved").rename(out / "shard_00001.safetensors")
    (out / "shard_00000.safetensors").write_bytes(b"garbage" * 20)
    fails("shard .*shard_00000.* corrupt")
    assert torch.equal(LatentDataset(out)[4]["latents"], digits(6)[4]["video"])  # other shards still read


def test_latent_dataset_pickles_for_workers(tmp_path):
    run(digits(6), tmp_path / "out")
    latents = LatentDataset(tmp_path / "out")
    first = latents[5]["latents"]
    copy = pickle.loads(pickle.dumps(latents))  # open handles are dropped, reopened on demand
    assert torch.equal(copy[5]["latents"], first)
    loader = torch.utils.data.DataLoader(latents, batch_size=3, num_workers=0, collate_fn=collate)
    assert [b["latents"].shape[0] for b in loader] == [3, 3]


# ---------------------------------------------------------------------------------------------- the command


def test_cli_preprocess_and_errors(small_folder, tmp_path, capsys):
    from dfm.cli import main

    out = tmp_path / "out"
    args = ["preprocess", "--data", "dataset=digits", "length=5", "num_frames=5", "size=16", "train.seed=3",
            "--vae", "identity", "--text-encoder", str(small_folder), "--out", str(out), "--shard-size", "2",
            "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "5 samples in 3 shards" in err and "3 written" in err
    latents = LatentDataset(out)
    assert torch.equal(latents[4]["latents"], MovingDigits(num_frames=5, size=16, length=5, seed=3)[4]["video"])
    assert latents.settings["data"]["length"] == 5 and latents.settings["seed"] == 3
    assert main(args) == 0 and "3 already complete" in capsys.readouterr().err

    bad = args[:]
    bad[bad.index("length=5")] = "length=6"
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.length" in err and "num_items" in err
    bad = args[:]
    bad[bad.index(str(small_folder))] = str(tmp_path / "no_encoder")
    assert main(bad) == 2 and "not found" in capsys.readouterr().err
    assert main(args[:3] + ["colour=red"] + args[6:]) == 2
    assert "colour" in capsys.readouterr().err

"""dfm eval: the metrics score real held-out Moving Digits clips high and corrupted clips low; evaluate() and the
CLI run end to end on a stand-in pipeline that returns real clips."""

import json

import pytest
import torch

from dfm import cli
from dfm.data.digits import COLORS, MovingDigits, parse_caption
from dfm.evaluate import (
    EvalError,
    ReferencePipeline,
    analyze,
    digit_classifier,
    eval_prompts,
    evaluate,
    motion_direction,
    nearest_color,
    score,
    temporal_consistency,
)


def real_clips(n=40, seed=7, **kwargs):
    """n held-out clips [n, 3, F, H, W] and what their captions say."""
    data = MovingDigits("test", **{"num_frames": 8, "size": 16, "length": n, "seed": seed, **kwargs})
    items = [data[i] for i in range(n)]
    expected = [{"digit": it["digit"], "direction": it["direction"], "color": it["color"]} for it in items]
    return torch.stack([it["video"] for it in items]), expected, items


@pytest.fixture(scope="module")
def coloured():
    return real_clips(colors=list(COLORS))


# ------------------------------------------------------------------------------------------ the classifier


def test_classifier_is_fitted_on_train_digits_and_generalises_to_held_out_ones():
    clf = digit_classifier(8)
    assert clf.num_train >= 1000 and clf.num_test >= 1000
    assert clf.test_accuracy >= 0.95  # held-out scans (test split), rendered as in a clip
    assert digit_classifier(8) is clf  # cached


# ------------------------------------------------------------------------------------------ real clips: the ceiling


def test_real_clips_score_high(coloured):
    videos, expected, _ = coloured
    summary = score(analyze(videos), expected)
    assert summary["digit_accuracy"] >= 0.9
    assert summary["direction_accuracy"] == 1.0 and summary["color_accuracy"] == 1.0
    assert summary["temporal_consistency"] > 0.97 and summary["frame_agreement"] > 0.93
    assert summary["motion_smoothness"] > 0.95


def test_direction_through_bounces_is_the_direction_at_frame_0():
    videos, expected, items = real_clips(n=40, seed=3, bounce=True, speed=2.0)
    assert all(it["bounces"] for it in items)
    # the test means something: for many clips the net displacement points the other way
    step = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}
    net_wrong = 0
    for it in items:
        axis, sign = step[it["direction"]]
        net = float(it["positions"][0, -1, axis] - it["positions"][0, 0, axis])
        net_wrong += net * sign <= 0
    assert net_wrong >= 8
    assert score(analyze(videos), expected)["direction_accuracy"] == 1.0


def test_larger_frames_score_high():
    videos, expected, _ = real_clips(n=12, num_frames=6, size=32)
    summary = score(analyze(videos), expected)
    assert summary["digit_accuracy"] >= 0.9 and summary["direction_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ corrupted clips score low


def test_pure_noise_scores_low(coloured):
    videos, expected, _ = coloured
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    summary = score(analyze(noise), expected)
    assert summary["digit_accuracy"] <= 0.3 and summary["direction_accuracy"] <= 0.4
    assert summary["color_accuracy"] <= 0.3 and summary["temporal_consistency"] < 0.2
    assert summary["motion_smoothness"] < 0.4


def test_blank_video_scores_zero(coloured):
    videos, expected, _ = coloured
    records = analyze(-torch.ones_like(videos[:4]))
    assert all(r["digit"] is None and r["direction"] is None and r["color"] is None for r in records)
    summary = score(records, expected[:4])
    assert summary["digit_accuracy"] == summary["direction_accuracy"] == summary["temporal_consistency"] == 0.0


def test_frozen_frames_have_no_direction(coloured):
    videos, expected, _ = coloured
    frozen = videos[:, :, :1].expand_as(videos).clone()  # the first frame held: the right digit, no motion
    summary = score(analyze(frozen), expected)
    assert summary["direction_accuracy"] == 0.0 and summary["motion_smoothness"] == 0.0
    assert summary["digit_accuracy"] >= 0.9  # the digit score does not depend on motion


def test_reversed_time_gives_the_wrong_direction(coloured):
    videos, expected, _ = coloured
    summary = score(analyze(videos.flip(2)), expected)
    assert summary["direction_accuracy"] == 0.0
    assert summary["digit_accuracy"] >= 0.9 and summary["color_accuracy"] == 1.0


def test_shuffled_frames_are_not_smooth(coloured):
    videos, expected, _ = coloured
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([v[:, torch.randperm(v.shape[1], generator=g)] for v in videos])
    summary = score(analyze(shuffled), expected)
    assert summary["motion_smoothness"] < 0.4 and summary["direction_accuracy"] <= 0.8
    assert summary["temporal_consistency"] > 0.95  # the digit itself is intact in every frame


def test_wrong_digit_and_wrong_colour_are_caught(coloured):
    videos, expected, _ = coloured
    records = analyze(videos)
    wrong_digit = [{**e, "digit": (e["digit"] + 1) % 10} for e in expected]
    assert score(records, wrong_digit)["digit_accuracy"] <= 0.05
    wrong_colour = [{**e, "color": "red" if e["color"] != "red" else "blue"} for e in expected]
    assert score(records, wrong_colour)["color_accuracy"] == 0.0


def test_identity_swap_half_way_breaks_consistency():
    videos, expected, _ = real_clips(n=40, seed=11)
    other = torch.roll(videos, 1, 0)
    keep = [i for i in range(40) if expected[i]["digit"] != expected[i - 1]["digit"]]
    swapped = videos.clone()
    swapped[:, :, 4:] = other[:, :, 4:]  # frames 4-7 show another clip's digit
    real, broken = score(analyze(videos[keep]), [expected[i] for i in keep]), analyze(swapped[keep])
    broken = score(broken, [expected[i] for i in keep])
    assert real["temporal_consistency"] > 0.97 and broken["temporal_consistency"] < 0.85
    assert broken["frame_agreement"] < 0.8 and real["frame_agreement"] > 0.93


# ------------------------------------------------------------------------------------------ the pieces


def test_motion_direction_on_tracks():
    t = torch.arange(8.0)
    for name, (dr, dc) in {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}.items():
        track = torch.stack([5 + dr * 0.8 * t, 5 + dc * 0.8 * t], -1)  # [F, 2]
        assert motion_direction(track, 0.4) == name
    bounce = torch.tensor([6.0, 7.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])  # right, then a longer way back
    assert motion_direction(torch.stack([torch.full((8,), 4.0), bounce], -1), 0.4) == "right"
    jitter = torch.tensor([5.0, 4.8, 5.6, 6.4, 7.2, 8.0, 8.8, 9.6])  # a 0.2 px wiggle the wrong way first
    assert motion_direction(torch.stack([torch.full((8,), 4.0), jitter], -1), 0.4) == "right"
    assert motion_direction(torch.full((8, 2), 5.0), 0.4) is None  # still
    gaps = torch.stack([torch.full((8,), 4.0), 5 - 0.8 * t], -1)
    gaps[[0, 3]] = float("nan")  # frames without an object are skipped
    assert motion_direction(gaps, 0.4) == "left"
    assert motion_direction(torch.full((8, 2), float("nan")), 0.4) is None


def test_nearest_color_ignores_brightness():
    for name, rgb in COLORS.items():
        assert nearest_color([0.6 * v for v in rgb]) == name


def test_temporal_consistency_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 8, generator=g), torch.rand(8, 8, generator=g)
    assert temporal_consistency(a.expand(6, 8, 8)) == pytest.approx(1.0)
    half = torch.stack([a] * 3 + [b] * 3)  # pairs within halves: 6 of 15 correlate 1; across: the a-b correlation
    x, y = a.flatten() - a.mean(), b.flatten() - b.mean()
    rho = max(0.0, float(x @ y / (x.norm() * y.norm())))
    assert temporal_consistency(half) == pytest.approx((6 + 9 * rho) / 15, abs=1e-6)


def test_eval_prompts_fixed_and_balanced():
    prompts = eval_prompts(40, seed=0)
    pairs = {(p["digit"], p["direction"]) for p in prompts}
    assert len(pairs) == 40  # every digit x direction once
    assert prompts == eval_prompts(40, seed=0) and prompts != eval_prompts(40, seed=1)
    for p in prompts:
        assert parse_caption(p["prompt"]) == {"digit": p["digit"], "direction": p["direction"], "color": None,
                                              "bounces": False}
    coloured = eval_prompts(24, colors=["red", "green"], seed=0)
    assert {p["color"] for p in coloured} == {"red", "green"} and len({p["prompt"] for p in coloured}) == 24
    with pytest.raises(EvalError, match="unknown colour"):
        eval_prompts(4, colors=["pink"])


# ------------------------------------------------------------------------------------------ evaluate() and the CLI


class RecordingPipeline(ReferencePipeline):
    """Real clips, with a record of each generate call; `transform` corrupts the videos."""

    def __init__(self, transform=None, nfe=7):
        super().__init__(num_frames=8, size=16)
        self.calls, self.transform, self.nfe = [], transform, nfe

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": list(prompts), **kwargs})
        gen = super().generate(prompts, **kwargs)
        gen.nfe = self.nfe
        if self.transform is not None:
            gen.videos = self.transform(gen.videos)
        return gen


def test_evaluate_runs_the_pipeline_and_scores(tmp_path):
    pipe = RecordingPipeline()
    result = evaluate(pipe, num_videos=10, seed=5, steps=12, guidance_scale=3.0, colors=["red", "cyan"], batch_size=4,
                      sheet=str(tmp_path / "sheet.png"))
    assert [len(c["prompts"]) for c in pipe.calls] == [4, 4, 2]
    assert [s for c in pipe.calls for s in c["seeds"]] == list(range(5, 15))  # video i: seed + i
    assert all(c["steps"] == 12 and c["guidance_scale"] == 3.0 and c["sampler"] is None for c in pipe.calls)
    assert result["num_videos"] == 10 and result["nfe"] == 7 and result["seconds_per_video"] > 0
    assert result["steps"] == 12 and result["sampler"] == "reference" and result["guidance_scale"] == 3.0
    assert result["digit_accuracy"] >= 0.8 and result["direction_accuracy"] == 1.0 and result["color_accuracy"] == 1.0
    assert [v["prompt"] for v in result["videos"]] == [p["prompt"] for p in eval_prompts(10, ["red", "cyan"], 5)]
    row = result["videos"][0]
    assert row["expected_direction"] == row["direction"] and len(row["frame_digits"]) == 8 and len(row["track"]) == 8
    assert (tmp_path / "sheet.png").stat().st_size > 0
    json.dumps(result)  # everything is plain JSON

    reversed_ = evaluate(RecordingPipeline(transform=lambda v: v.flip(2)), num_videos=4)
    assert reversed_["direction_accuracy"] == 0.0


def test_evaluate_with_given_prompts():
    prompts = ["the digit 3 moves up", "a green digit 8 moves to the left"]
    result = evaluate(RecordingPipeline(), prompts=prompts)
    assert [v["expected_color"] for v in result["videos"]] == [None, "green"]
    assert result["direction_accuracy"] == 1.0 and result["color_accuracy"] == 1.0  # only the coloured one counts
    with pytest.raises(EvalError, match="one digit"):
        evaluate(RecordingPipeline(), prompts=["the digit 3 moves up and the digit 4 moves down"])
    with pytest.raises(EvalError, match="cannot parse"):
        evaluate(RecordingPipeline(), prompts=["a cat"])


def test_cli_reference_table_and_json(tmp_path, capsys):
    out = tmp_path / "ref.json"
    assert cli.main(["eval", "--reference", "--num", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| digit acc | direction acc | colour acc | temporal consistency |" in table
    assert "| reference | 0 | n/a |" in table
    report = json.loads(out.read_text())
    assert report["reference"] and len(report["results"]) == 1 and len(report["results"][0]["videos"]) == 4


def test_cli_sweep_reads_colours_from_the_training_config(tmp_path, capsys, monkeypatch):
    model = tmp_path / "run" / "checkpoints" / "step_00000010"
    model.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  colors: [red, blue]\n  num_digits: 1\n")
    pipe = RecordingPipeline()
    monkeypatch.setattr("dfm.evaluate._load_pipeline", lambda path, device: pipe)
    args = ["eval", "--model", str(model), "--num", "2", "--sweep-guidance", "1,4", "--sweep-steps", "3,5",
            "--json", str(tmp_path / "sweep.json")]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert table.count("| reference |") == 4  # one row per (guidance, steps)
    settings = [(c["guidance_scale"], c["steps"]) for c in pipe.calls]
    assert settings == [(1.0, 3), (1.0, 5), (4.0, 3), (4.0, 5)]
    assert all(parse_caption(p)["color"] in ("red", "blue") for c in pipe.calls for p in c["prompts"])
    results = json.loads((tmp_path / "sweep.json").read_text())["results"]
    assert [r["guidance_scale"] for r in results] == [1.0, 1.0, 4.0, 4.0]

    pipe.calls.clear()
    pipe.config_yaml = "data:\n  colors: [green]\n"  # a model folder's own training config wins
    assert cli.main(["eval", "--model", str(model), "--num", "3"]) == 0
    assert all(parse_caption(p)["color"] == "green" for c in pipe.calls for p in c["prompts"])
    pipe.calls.clear()
    assert cli.main(["eval", "--model", str(model), "--num", "3", "--colors", "none"]) == 0
    assert all(parse_caption(p)["color"] is None for c in pipe.calls for p in c["prompts"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "missing")]) == 2  # dfm.pipeline's error, one line
    err = capsys.readouterr().err
    assert "missing" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", "--reference", "--sweep-steps", "5,x"]) == 2
    err = capsys.readouterr().err
    assert "--sweep-steps" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", "--reference", "--colors", "pink"]) == 2
    assert "--colors" in capsys.readouterr().err

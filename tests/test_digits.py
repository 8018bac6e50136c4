"""Moving Digits: determinism, captions, motion, bounce, held-out split, colours."""

import pytest
import torch
import torch.nn.functional as F

from dfm.data import COLORS, DIRECTIONS, MovingDigits, caption_for, collate, parse_caption
from dfm.data.digits import NUM_IMAGES, load_digit_images, split_indices, upscale_digits

# (row, column) step per frame, written out independently of the code: rows grow downwards, so "up" is -1.
STEPS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


def centre_of_mass(video):
    """[3, F, H, W] in [-1, 1] -> [F, 2] (row, col) brightness-weighted centre per frame."""
    weight = (video + 1).sum(0)  # [F, H, W], background 0
    rows = torch.arange(video.shape[2], dtype=torch.float32).view(1, -1, 1)
    cols = torch.arange(video.shape[3], dtype=torch.float32).view(1, 1, -1)
    total = weight.sum((1, 2))
    return torch.stack([(weight * rows).sum((1, 2)) / total, (weight * cols).sum((1, 2)) / total], dim=1)


def test_same_seed_same_clip_different_index_different_clip():
    a, b = MovingDigits(seed=3), MovingDigits(seed=3)
    first, second = a[5], b[5]
    assert torch.equal(first["video"], second["video"]) and first["caption"] == second["caption"]
    _ = a[7]  # access order does not matter: item 5 depends only on (seed, 5)
    assert torch.equal(a[5]["video"], first["video"])
    assert not torch.equal(a[6]["video"], first["video"])
    assert not torch.equal(MovingDigits(seed=4)[5]["video"], first["video"])


def test_item_layout():
    item = MovingDigits(num_frames=8, size=24)[0]
    assert item["video"].shape == (3, 8, 24, 24) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["video"].min() == -1 and item["video"].max() > 0.5  # black background, bright digit
    assert item["positions"].shape == (1, 8, 2) and item["digit_size"] == 12
    assert item["digit"] in range(10) and item["direction"] in DIRECTIONS and item["color"] is None
    batch = collate([MovingDigits()[i] for i in range(3)])
    assert batch["video"].shape == (3, 3, 16, 32, 32) and batch["color"] == [None] * 3


def test_caption_grammar_examples():
    assert caption_for(7, "left") == "the digit 7 moves to the left"
    assert caption_for(7, "up", "red") == "a red digit 7 moves up"
    assert caption_for([3, 5], ["right", "down"]) == "the digit 3 moves to the right and the digit 5 moves down"
    assert caption_for(2, "down", "orange", bounces=True) == "an orange digit 2 moves down and bounces"
    assert parse_caption("the digit 3 moves right and the digit 5 moves down") == {
        "digit": [3, 5], "direction": ["right", "down"], "color": [None, None], "bounces": [False, False]
    }
    assert parse_caption("A red digit 7 moves up.") == {"digit": 7, "direction": "up", "color": "red", "bounces": False}
    for bad in ("a cat moves left", "the digit 7 moves sideways", "the digit 7 moves up and jumps", "a pink digit 1 moves up", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError, match="unknown colour"):
        caption_for(1, "up", "pink")


@pytest.mark.parametrize(
    "options",
    [{}, {"colors": list(COLORS)}, {"num_digits": 2, "colors": ["red", "blue"]}, {"bounce": True, "speed": 3.0, "num_digits": 2}],
)
def test_captions_parse_back_to_the_generating_attributes(options):
    data = MovingDigits(**options)
    for i in range(40):
        item = data[i]
        fields = {key: item[key] for key in ("digit", "direction", "color", "bounces")}
        assert parse_caption(item["caption"]) == fields


def test_directions_really_move_the_digit():
    data = MovingDigits(num_frames=12, size=32, speed=1.25)
    seen = set()
    for i in range(24):
        item = data[i]
        com = centre_of_mass(item["video"])  # [F, 2]
        step = torch.tensor(STEPS[item["direction"]]) * 1.25  # expected (row, col) move per frame
        moves = com[1:] - com[:-1]  # [F-1, 2]
        assert torch.allclose(moves, step.expand_as(moves), atol=0.02), (item["caption"], moves)
        # the reported positions move the same way
        assert torch.allclose(item["positions"][0, 1:] - item["positions"][0, :-1], step.expand_as(moves), atol=1e-4)
        seen.add(item["direction"])
    assert seen == set(DIRECTIONS)


def test_digit_stays_whole_inside_the_frame():
    for bounce, speed in ((False, None), (True, 5.0)):
        data = MovingDigits(num_frames=24, size=32, bounce=bounce, speed=speed)
        for i in range(16):
            item = data[i]
            mass = (item["video"] + 1).sum((0, 2, 3))  # [F] total brightness: drops if the digit leaves the frame
            assert torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-3), (bounce, item["caption"])
            half = (data.digit_size - 1) / 2
            assert item["positions"].min() >= half - 1e-4 and item["positions"].max() <= 31 - half + 1e-4


def test_bounce_reverses_direction():
    data = MovingDigits(num_frames=24, size=32, bounce=True, speed=3.0)
    for i in range(8):
        item = data[i]
        assert item["bounces"] and item["caption"].endswith("and bounces")
        axis = 0 if item["direction"] in ("up", "down") else 1
        moves = (centre_of_mass(item["video"])[1:] - centre_of_mass(item["video"])[:-1])[:, axis]
        sign = STEPS[item["direction"]][axis]
        assert moves[0] * sign > 0 and (moves * sign < 0).any()  # starts the named way, later comes back
    assert not MovingDigits(bounce=True, speed=0.1, num_frames=4)[0]["bounces"]  # too slow to reach a wall


def test_held_out_split_is_disjoint_and_fixed():
    train, test = split_indices("train"), split_indices("test")
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert len(train) + len(test) == NUM_IMAGES and len(test) == round(0.2 * NUM_IMAGES)
    _, labels = load_digit_images()
    assert set(labels[test].tolist()) == set(range(10))  # every digit is evaluated
    rows = {MovingDigits(split="test", seed=s)[i]["image_index"] for s in range(3) for i in range(30)}
    assert rows <= set(test.tolist())
    assert torch.equal(split_indices("test"), test)  # does not depend on any dataset seed
    with pytest.raises(ValueError, match="split"):
        split_indices("val")


def test_upscaled_digits_stay_readable():
    images, _ = load_digit_images()
    big = upscale_digits(images[:50], 16)  # [50, 16, 16]
    back = F.avg_pool2d(big[:, None], 2)[:, 0]  # [50, 8, 8]
    correlation = torch.corrcoef(torch.stack([back.flatten(), images[:50].flatten()]))[0, 1]
    assert correlation > 0.95


def test_colour_is_drawn():
    item = MovingDigits(colors=["red"])[0]
    brightest = item["video"].amax(dim=(1, 2, 3))  # [3] per-channel maximum
    assert item["color"] == "red" and brightest[0] > 0.9 and brightest[1] < -0.5 and brightest[2] < -0.5


def test_bad_options_raise():
    with pytest.raises(ValueError, match="bounce=True"):
        MovingDigits(num_frames=32, size=32, speed=2.0)
    with pytest.raises(ValueError, match="colour"):
        MovingDigits(colors=["pink"])
    with pytest.raises(ValueError, match="num_digits"):
        MovingDigits(num_digits=3)
    with pytest.raises(IndexError):
        MovingDigits(length=4)[4]

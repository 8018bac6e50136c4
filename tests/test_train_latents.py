"""The trainer on what `dfm preprocess` writes (latents + stored text embeddings) and with a frozen Hugging Face
text encoder (issue 5): the encoder stays outside the trained weights, dropped captions become the empty prompt's
embedding, and the checkpoint samples through the pipeline with the same encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from test_text_hf import spm_t5_tokenizer  # noqa: E402
from test_train import tiny  # noqa: E402

from dfm.config import ConfigError  # noqa: E402
from dfm.data import MovingDigits  # noqa: E402
from dfm.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from dfm.preprocess import preprocess  # noqa: E402
from dfm.text import load_text_encoder  # noqa: E402
from dfm.training import Trainer, train  # noqa: E402
from dfm.vae import IdentityVAE  # noqa: E402


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    tok = spm_t5_tokenizer(root)
    config = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    transformers.T5EncoderModel(config).save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    return root / "t5"


@pytest.fixture(scope="module")
def latents(t5, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "digits"
    data = MovingDigits(num_frames=2, size=8, length=12, seed=0)
    preprocess(data, IdentityVAE(), load_text_encoder(t5), out, shard_size=8, batch_size=4, verbose=False)
    return out


def test_train_on_preprocessed_latents_with_a_frozen_encoder(t5, latents, tmp_path):
    cfg = tiny(tmp_path, "lat", "train.max_steps=2", "train.validate_every=2", "sampling.steps=2",
               "train.val_prompts=[the digit 1 moves up]", f"text.encoder={t5}", "text.dropout=0.9",
               data={"dataset": "latents", "root": str(latents)})
    trainer = Trainer(cfg)
    assert trainer.frozen_text is not None and trainer.module.text is None
    batch = next(iter(trainer.loader()))
    assert batch["latents"].shape == (4, 3, 2, 8, 8) and batch["context"].shape[-1] == 16
    context, mask, keep = trainer.conditioning(batch)
    null, null_mask = trainer.frozen_text.encode([""])
    for row in range(4):  # kept rows are the stored embeddings; dropped ones the empty prompt's
        if keep[row]:
            assert torch.equal(context[row], batch["context"][row])
        else:
            n = null.shape[1]
            assert torch.allclose(context[row, :n], null[0]) and not mask[row, n:].any()
    assert not keep.all() and keep.any()  # dropout 0.9 on these samples drops three, keeps one
    result = trainer.run()
    assert result["step"] == 2 and math.isfinite(result["loss"])
    ckpt = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    assert json.loads((ckpt / "text.json").read_text())["type"] == "frozen"
    assert not any(k.startswith("text.") for k in load_checkpoint(ckpt)["model"])  # the encoder is not trained
    assert (Path(cfg.train.output_dir) / "samples" / "step_00000002" / "00.mp4").is_file()

    from dfm.pipeline import load_pipeline

    pipe = load_pipeline(Path(cfg.train.output_dir))
    out = pipe.generate("the digit 1 moves up", steps=2, num_frames=2, height=8, width=8, seed=0, progress=False)
    assert out.videos.shape == (1, 3, 2, 8, 8) and torch.isfinite(out.videos).all()
    # exported with the frozen encoder (model + tokenizer) inside the folder: the same videos
    from dfm.pipeline import export_checkpoint

    folder = export_checkpoint(Path(cfg.train.output_dir), tmp_path / "exported")
    again = load_pipeline(folder).generate("the digit 1 moves up", steps=2, num_frames=2, height=8, width=8, seed=0,
                                           progress=False)
    assert torch.allclose(again.videos, out.videos, atol=1e-6)


def test_frozen_encoder_on_raw_videos_encodes_each_batch(t5, tmp_path):
    cfg = tiny(tmp_path, "raw", "train.max_steps=1", f"text.encoder={t5}")
    result = train(cfg)
    assert result["step"] == 1 and math.isfinite(result["loss"])


def test_latents_need_the_encoder_they_were_made_with(latents, tmp_path):
    cfg = tiny(tmp_path, "mismatch", data={"dataset": "latents", "root": str(latents)})
    with pytest.raises(ConfigError, match="stores embeddings of the text encoder"):
        Trainer(cfg)


def test_latents_must_match_the_clip_size(latents, t5, tmp_path):
    cfg = tiny(tmp_path, "size", f"text.encoder={t5}", data={"dataset": "latents", "root": str(latents), "size": 16})
    with pytest.raises(ConfigError, match=r"holds latents of shape \(3, 2, 8, 8\).*data.size=16"):
        Trainer(cfg)


def test_stored_embeddings_keep_their_length(t5, tmp_path):
    out = tmp_path / "short"
    data = MovingDigits(num_frames=2, size=8, length=8, seed=0)
    preprocess(data, IdentityVAE(), load_text_encoder(t5, max_length=8), out, shard_size=8, batch_size=4,
               verbose=False)
    cfg = tiny(tmp_path, "short", "train.max_steps=1", f"text.encoder={t5}", "text.dropout=0.9",
               data={"dataset": "latents", "root": str(out)})
    trainer = Trainer(cfg)
    assert trainer.frozen_text.max_length == 8  # the stored rows' length, not the model's 512
    context, mask, keep = trainer.conditioning(next(iter(trainer.loader())))
    assert context.shape[1] == 8 and not keep.all()

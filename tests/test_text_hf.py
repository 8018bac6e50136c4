"""Hugging Face text encoders behind `load_text_encoder`: tiny random T5 / UMT5 / CLIP models with tokenizers trained
on the spot, saved with save_pretrained, loaded through dfm and compared with transformers (and, for Wan's UMT5
rule, with diffusers' WanPipeline._get_t5_prompt_embeds) on identical inputs; the cache, masks and errors."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from dfm.errors import UserError  # noqa: E402
from dfm.text import (  # noqa: E402
    FrozenTextEncoder,
    SmallTextConfig,
    SmallTextEncoder,
    TextEncoderError,
    WordTokenizer,
    load_text_encoder,
    wan_prompt_clean,
)

SENTENCES = [
    "the digit 7 moves to the left",
    "a red digit 3 moves up and bounces",
    "a cat and a dog bake a cake together in a kitchen",
    "the quick brown fox jumps over the lazy dog",
    "sunlight streams through the window onto the table",
    "an orange digit 5 moves down",
]
PROMPTS = ["the digit 7 moves to the left", "a cat &amp; a   dog\tbake", "", "zebra quartz!"]


def load_quiet(cls, folder):
    return cls.from_pretrained(str(folder), local_files_only=True).eval()


def spm_t5_tokenizer(folder):
    """A tiny unigram sentencepiece model (T5's id layout: pad 0, eos 1, unk 2, no bos) as a T5Tokenizer."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "sp"),
                                   vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    assert tok("the digit 7").input_ids[:-1] == sp.encode("the digit 7")  # the same pieces as sentencepiece
    return tok


def bpe_clip_tokenizer():
    """A tiny byte-level BPE (CLIP's </w> word ends) trained with `tokenizers`, wrapped in a CLIPTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                                  show_progress=False)
    bpe.train_from_iterator(SENTENCES * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models: {"t5", "umt5", "clip", "clip_proj", "t5_tok", "wan" (diffusers layout)}."""
    root = tmp_path_factory.mktemp("text_hf")
    torch.manual_seed(0)
    t5_tok = spm_t5_tokenizer(root)
    clip_tok = bpe_clip_tokenizer()
    out = {}
    t5_common = dict(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    for name, config, model_class in (
        ("t5", transformers.T5Config(**t5_common), transformers.T5EncoderModel),
        ("umt5", transformers.UMT5Config(**t5_common), transformers.UMT5EncoderModel),
    ):
        model_class(config).save_pretrained(root / name)
        t5_tok.save_pretrained(root / name)
        out[name] = root / name
    clip_config = transformers.CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, projection_dim=8, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    for name, model_class in (("clip", transformers.CLIPTextModel),
                              ("clip_proj", transformers.CLIPTextModelWithProjection)):
        model_class(clip_config).save_pretrained(root / name)
        clip_tok.save_pretrained(root / name)
        out[name] = root / name
    # Wan's diffusers layout: model_index.json, text_encoder/ (no tokenizer inside), tokenizer/
    wan = root / "wan"
    shutil.copytree(root / "umt5", wan / "text_encoder", ignore=shutil.ignore_patterns("tokenizer*"))
    t5_tok.save_pretrained(wan / "tokenizer")
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    out["wan"], out["root"] = wan, root
    return out


def call_transformers(folder, model_class, prompts, max_length, use_mask=True):
    """The reference: the tokenizer and model called directly."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = load_quiet(model_class, folder)
    t = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask if use_mask else None)
    return out, t.attention_mask.bool()


# ---------------------------------------------------------------------------------------------- agreement


def test_t5_matches_transformers(folders):
    enc = load_text_encoder(folders["t5"], max_length=20)
    assert enc.describe()["type"] == "t5" and type(enc.model).__name__ == "T5EncoderModel"
    emb, mask = enc.encode(PROMPTS)
    ref, ref_mask = call_transformers(folders["t5"], transformers.T5EncoderModel, PROMPTS, 20)
    assert emb.shape == (4, 20, 16) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    torch.testing.assert_close(emb, ref.last_hidden_state, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask)
    assert mask[2].sum() == 1  # the empty prompt is </s>: never an all-masked row
    # default max length: our tokenizer states no limit, so T5 gets 512
    assert load_text_encoder(folders["t5"]).max_length == 512


def test_umt5_is_wan_get_t5_prompt_embeds(folders):
    diffusers = pytest.importorskip("diffusers")
    long_prompt = " ".join(SENTENCES * 12)  # > 512 tokens: truncated
    prompts = ["a cat &amp;amp; a dog\n  bake   a cake ", "the digit 7 moves to the left", "", long_prompt]
    enc = load_text_encoder(folders["wan"])  # diffusers layout: text_encoder/ + tokenizer/
    assert enc.kind == "umt5" and enc.max_length == 512 and enc.tokenizer_source.endswith("tokenizer")
    emb, mask = enc.encode(prompts)

    pipe = diffusers.WanPipeline(tokenizer=enc.tokenizer, text_encoder=load_quiet(transformers.UMT5EncoderModel,
                                 folders["wan"] / "text_encoder"), vae=None,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():  # as WanPipeline.__call__ runs it (grad mode picks other attention kernels: ~1e-6 apart)
        ref = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=512, device=torch.device("cpu"),
                                         dtype=torch.float32)
    assert emb.shape == ref.shape == (4, 512, 16)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    lengths = mask.sum(1)
    assert lengths[3] == 512 and 1 <= lengths[2] < lengths[1]  # truncated; "" is one token
    assert enc.count_tokens(long_prompt) > 512 and [enc.count_tokens(p) for p in prompts[:3]] == lengths[:3].tolist()
    assert emb[~mask].abs().max() == 0 and emb[mask].abs().min() > 0  # zeros exactly where the mask is False
    # the mask is a prefix: real tokens first
    assert torch.equal(mask, torch.arange(512)[None] < lengths[:, None])


def test_wan_prompt_clean():
    assert wan_prompt_clean("  a &amp;amp; b\n\t c  ") == "a & b c"


@pytest.mark.parametrize("name,cls", [("clip", "CLIPTextModel"), ("clip_proj", "CLIPTextModelWithProjection")])
def test_clip_matches_transformers(folders, name, cls):
    enc = load_text_encoder(folders[name])
    assert type(enc.model).__name__ == cls and enc.max_length == 24  # the position table
    emb, mask = enc.encode(PROMPTS)
    pooled = enc.encode_pooled(PROMPTS)
    ref, ref_mask = call_transformers(folders[name], getattr(transformers, cls), PROMPTS, 24, use_mask=False)
    torch.testing.assert_close(emb, ref.last_hidden_state, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask) and mask[2].sum() == 2  # "" is <|startoftext|> <|endoftext|>
    ref_pooled = ref.text_embeds if cls.endswith("Projection") else ref.pooler_output
    assert pooled.shape == (4, 8 if cls.endswith("Projection") else 16) == (4, enc.pooled_dim)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    with pytest.raises(TextEncoderError, match="positions"):
        load_text_encoder(folders[name], max_length=30)


def test_t5_has_no_pooled_embedding(folders):
    with pytest.raises(TextEncoderError, match="no pooled"):
        load_text_encoder(folders["t5"], max_length=8).encode_pooled(["a"])


def test_small_encoder_folder(tmp_path):
    tok = WordTokenizer.from_captions(SENTENCES)
    small = SmallTextEncoder(tok, SmallTextConfig(dim=16, layers=1, heads=2, max_length=12)).eval()
    small.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.describe()["type"] == "small" and enc.dim == 16 and enc.max_length == 12
    emb, mask = enc.encode(SENTENCES[:3])
    ref, ref_mask = small.encode(SENTENCES[:3])
    assert [min(enc.count_tokens(p), 12) for p in SENTENCES[:3]] == mask.sum(1).tolist()  # the third is cut
    torch.testing.assert_close(emb, ref)
    assert torch.equal(mask, ref_mask)
    assert load_text_encoder(tmp_path, max_length=4).encode(SENTENCES[:1])[0].shape == (1, 4, 16)
    with pytest.raises(TextEncoderError, match="max_length"):
        load_text_encoder(tmp_path, max_length=13)


# ---------------------------------------------------------------------------------------------- frozen, cache


def test_frozen_eval_and_no_grad(folders):
    enc = load_text_encoder(folders["t5"], max_length=8)
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert isinstance(enc, FrozenTextEncoder)
    half = load_text_encoder(folders["umt5"], max_length=8, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and half.encode(["a"])[0].dtype == torch.float32
    half.encode(["a"])
    half.to(torch.float32)  # moving the model drops the cache (its rows were made by the old weights)
    assert half.cache_info()["entries"] == 0 and half.model.dtype == torch.float32


def test_cache_hits_and_identical_results(folders):
    enc = load_text_encoder(folders["umt5"], max_length=32)
    calls = []
    enc.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)
    first, first_mask = enc.encode(["a", "b c", "a"])  # "a" twice: encoded once
    assert calls == [2] and enc.cache_info()["misses"] == 2 and enc.cache_info()["hits"] == 1
    again, again_mask = enc.encode(["b c", "a", "new prompt", "a"])
    assert calls == [2, 1]  # only the new prompt reached the model
    assert enc.cache_info()["hits"] == 4 and enc.cache_info()["misses"] == 3
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    assert torch.equal(again_mask[1], first_mask[0])
    # a cached row equals encoding it fresh in another batch
    fresh = load_text_encoder(folders["umt5"], max_length=32, cache_bytes=0)
    torch.testing.assert_close(again, fresh.encode(["b c", "a", "new prompt", "a"])[0], rtol=0, atol=1e-6)
    assert fresh.cache_info()["entries"] == 0


def test_cache_is_bounded_lru(folders):
    enc = load_text_encoder(folders["t5"], max_length=8)
    row_bytes = 8 * 16 * 4 + 8  # full rows: T5 keeps its padded outputs
    enc.cache_bytes = 2 * row_bytes
    enc.encode(["a"]), enc.encode(["b"]), enc.encode(["a"])  # "a" most recent
    enc.encode(["c"])  # evicts "b"
    assert enc.cache_info()["entries"] == 2 and enc.cache_info()["bytes"] <= 2 * row_bytes
    before = enc.cache_info()["misses"]
    enc.encode(["a", "c"])
    assert enc.cache_info()["misses"] == before
    enc.encode(["b"])
    assert enc.cache_info()["misses"] == before + 1


def test_wan_cache_keeps_only_real_tokens(folders):
    enc = load_text_encoder(folders["umt5"])
    enc.encode(["a cat"])
    (row, mask, _), = enc._cache.values()
    assert row.shape[0] == mask.sum() < 512


# ---------------------------------------------------------------------------------------------- errors


def one_line_error(path, match, **kwargs):
    with pytest.raises(TextEncoderError, match=match) as info:
        load_text_encoder(path, **kwargs)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    return str(info.value)


def test_missing_folder_and_config(tmp_path):
    one_line_error(tmp_path / "nope", "not found")
    one_line_error(tmp_path, "no config.json")
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(tmp_path, "not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    one_line_error(tmp_path, "supported text encoders")


def test_missing_tokenizer(folders, tmp_path):
    bare = tmp_path / "bare" / "umt5"
    shutil.copytree(folders["umt5"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    message = one_line_error(bare, "no tokenizer files")
    assert "--tokenizer" in message
    assert load_text_encoder(bare, tokenizer=folders["t5"], max_length=8).kind == "umt5"  # given explicitly
    # a tokenizer too large for the model's embedding table
    one_line_error(bare, "belongs to this model", tokenizer=folders["clip"])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_model", "bin_only"])
def test_corrupt_weights(folders, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(folders["umt5"], broken)
    weights = broken / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "other_model":
        shutil.copy(folders["clip"] / "model.safetensors", weights)
    else:
        weights.rename(broken / "pytorch_model.bin")
    match = {"other_model": "lack", "bin_only": "only safetensors"}.get(damage, "unreadable")
    one_line_error(broken, match)


import torch

from dfm.text import BOS, PAD, UNK, SmallTextConfig, SmallTextEncoder, WordTokenizer


def test_tokenizer_vocab_bos_unk_and_padding():
    tok = WordTokenizer.from_captions(["the digit 7 moves to the left", "a red digit 3 moves up"])
    ids, mask = tok(["the digit 7 moves up", "", "a purple digit"], max_length=8)
    assert ids.shape == (3, 6) and ids[:, 0].eq(BOS).all()
    assert mask.sum(1).tolist() == [6, 1, 4]
    assert ids[2, 2].item() == UNK and ids[1, 1:].eq(PAD).all()
    ids, mask = tok(["the digit 7 moves to the left"], max_length=4)
    assert ids.shape == (1, 4)  # truncated


def test_encoder_shapes_mask_and_padding_invariance():
    torch.manual_seed(0)
    tok = WordTokenizer.from_captions(["the digit 7 moves to the left", "the digit 1 moves up"])
    enc = SmallTextEncoder(tok, SmallTextConfig(dim=32, layers=2, heads=4, max_length=16)).eval()
    emb, mask = enc.encode(["the digit 7 moves to the left", "the digit 1 moves up", ""])
    assert emb.shape == (3, 8, 32) and mask.shape == (3, 8)
    assert emb[~mask].abs().max() == 0 and torch.isfinite(emb).all()
    # a prompt's embedding does not depend on the padding its batch adds
    alone, _ = enc.encode(["the digit 1 moves up"])
    torch.testing.assert_close(alone[0], emb[1, : alone.shape[1]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb[0, 1:5], emb[1, 1:5])


def test_save_load_round_trip(tmp_path):
    tok = WordTokenizer.from_captions(["a b c"])
    enc = SmallTextEncoder(tok, SmallTextConfig(dim=16, layers=1, heads=2, max_length=8)).eval()
    enc.save_pretrained(tmp_path)
    enc2 = SmallTextEncoder.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(enc.encode(["a c b", "b"])[0], enc2.encode(["a c b", "b"])[0])


# ------------------------------------------------------------------ issue 13: unknown words are named, once


def test_unknown_words_warn_once_naming_them_and_the_vocabulary():
    import warnings

    import pytest

    from dfm.text import FrozenSmallTextEncoder, UnknownWordsWarning

    tok = WordTokenizer.from_captions(["the digit 7 moves to the left", "the digit 1 moves up"])
    assert tok.unknown(["a cat surfing", "the cat"]) == ["a", "cat", "surfing"]
    enc = SmallTextEncoder(tok, SmallTextConfig(dim=16, layers=1, heads=2, max_length=8)).eval()
    with pytest.warns(UnknownWordsWarning) as caught:
        enc.encode(["a cat surfing"])
    (message,) = [str(w.message) for w in caught]
    assert "does not know 'a', 'cat', 'surfing' (read as <unk>" in message and len(message.splitlines()) == 1
    assert message.endswith("it knows 8 words: 1 7 digit left moves the to up")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same words again, in another prompt or call: no second warning
        enc.encode(["a cat surfing", "surfing a cat"])
        enc.encode(["the digit 7 moves up", ""])  # known words: nothing to say
    with pytest.warns(UnknownWordsWarning, match="does not know 'dog'"):  # a new set of words: said once more
        enc.encode(["the dog"])
    frozen = FrozenSmallTextEncoder(SmallTextEncoder(tok, SmallTextConfig(dim=16, layers=1, heads=2, max_length=8)))
    with pytest.warns(UnknownWordsWarning, match="'cat'"):  # the frozen wrapper (what a pipeline holds) warns too
        frozen.encode(["the cat"])
    big = WordTokenizer.from_captions([" ".join(f"w{i}" for i in range(100))])
    assert big.summary().startswith("100 words, e.g. w0 w1") and big.summary().endswith("...")

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

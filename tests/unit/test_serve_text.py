"""`nx.serve.text`: incremental detokenizing (whole characters only, no special tokens) and text
stop sequences, on a byte-level tokenizer built offline (one token per UTF-8 byte)."""

from __future__ import annotations

import pytest

from nx.serve.text import Detokenizer, StopMatcher


@pytest.fixture(scope="module")
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|end|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>")


def test_pieces_are_whole_characters_and_add_up_to_the_text(byte_tokenizer):
    text = "é 日本 🙂!"
    ids = byte_tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: characters span several tokens
    dec = Detokenizer(byte_tokenizer)
    pieces = [dec.push(t) for t in [*ids, byte_tokenizer.eos_token_id]]
    assert "".join(pieces) == text and dec.flush() == ""
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[-1] == ""  # the special EOS token shows no text
    assert [p for p in pieces if p] == ["é", " ", "日", "本", " ", "🙂", "!"]


def test_flush_releases_an_incomplete_character_at_the_end(byte_tokenizer):
    ids = byte_tokenizer("a日")["input_ids"][:-1]  # "a" and two of 日's three bytes
    dec = Detokenizer(byte_tokenizer)
    assert [dec.push(t) for t in ids] == ["a", "", ""]
    assert dec.flush() == "\ufffd"


def test_stop_sequence_split_over_pieces_cuts_before_it():
    m = StopMatcher(["END", "##"])
    out = [m.feed(p) for p in ["hello E", "N", "D world"]]
    assert out == [("hello ", False), ("", False), ("", True)]  # "E" and "EN" may begin "END": held back
    assert m.text == "hello " and m.feed("more") == ("", True)


def test_stop_earliest_of_several_and_held_back_text_flushed():
    m = StopMatcher(["xyz", "b"])
    assert m.feed("aaxy") == ("aa", False)  # "xy" may start "xyz": held back
    assert m.feed("z!") == ("", True) and m.text == "aa"
    m = StopMatcher(["xyz", "b"])
    assert m.feed("aaxy") == ("aa", False)
    assert m.feed("q") == ("xyq", False)  # "xyq" begins no stop sequence
    assert m.feed("x") == ("", False) and m.flush() == "x"
    m = StopMatcher(["cd", "bc"])
    assert m.feed("abcd") == ("a", True)
    assert StopMatcher([]).feed("any") == ("any", False)

import json

import pytest

from minituner.course import corpus
from minituner.models.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def texts():
    records = [s.to_record() for s in corpus.all_sentences() if corpus.is_pretraining_sentence(s)]
    return corpus.pretraining_texts(records)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts)


def test_exactly_64_tokens_with_specials(tokenizer):
    assert tokenizer.vocab_size == 64
    vocab = tokenizer.engine.get_vocab()
    for token in SPECIAL_TOKENS:
        assert token in vocab
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)


def test_round_trip_every_corpus_line(tokenizer):
    for sentence in corpus.all_sentences():
        for text in (sentence.en, sentence.es):
            ids = tokenizer.encode(text)
            assert tokenizer.unk_id not in ids, text
            assert tokenizer.decode(ids) == text


def test_bos_eos_framing(tokenizer):
    ids = tokenizer.encode("he can go", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "he can go"


def test_unknown_characters_map_to_unk(tokenizer):
    assert tokenizer.unk_id in tokenizer.encode("HELLO!")


def test_training_is_deterministic(texts):
    assert train_tokenizer(texts).engine.to_str() == train_tokenizer(texts).engine.to_str()


def test_save_load_and_version_check(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(path)
    assert loaded.encode("yesterday she walked home") == tokenizer.encode(
        "yesterday she walked home"
    )
    payload = json.loads(path.read_text())
    payload["version"] = 99
    other = tmp_path / "other.json"
    other.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="version 99"):
        Tokenizer.load(other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")

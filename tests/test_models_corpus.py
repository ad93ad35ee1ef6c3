"""The offline corpora: deterministic, split by path hash, and a tokenizer that round-trips them."""

from shared.models import corpus


def test_heldout_prompts_are_deterministic_and_sized():
    for domain in corpus.DOMAINS:
        first = corpus.heldout_prompts(domain, 5, prompt_chars=120, seed=3)
        assert first == corpus.heldout_prompts(domain, 5, prompt_chars=120, seed=3)
        assert first != corpus.heldout_prompts(domain, 5, prompt_chars=120, seed=4)
        assert all(len(p) == 120 for p in first)


def test_heldout_and_train_are_disjoint_and_both_present():
    for domain in corpus.DOMAINS:
        train = {d.name for d in corpus.documents(domain, "train")}
        heldout = {d.name for d in corpus.documents(domain, "heldout")}
        assert train and heldout and not train & heldout


def test_prose_is_words_not_code():
    prose = "\n".join(d.text for d in corpus.documents("prose", "heldout"))
    code = "\n".join(d.text for d in corpus.documents("code", "heldout"))
    assert prose.count("def ") / len(prose) < code.count("def ") / len(code) / 5


def test_prose_of_source_takes_docstrings_and_comments():
    source = '"""Module words here, long enough."""\n# a comment that is long enough to keep\nx = 1  # inline\n'
    text = corpus.prose_of_source(source)
    assert "Module words here" in text and "a comment that is long enough" in text and "x = 1" not in text


def test_corpus_hash_is_stable():
    assert corpus.corpus_hash() == corpus.corpus_hash()
    assert len(corpus.corpus_hash()) == 64


def test_tokenizer_round_trips_code_and_prose(tiny_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_family.path("target")))
    samples = corpus.heldout_prompts("code", 20, 300) + corpus.heldout_prompts("prose", 20, 300)
    samples += ["  indented\n\ttabs\r\n", "unicode: héllo — 𝔘 ✓", ""]
    for text in samples:
        ids = tok.encode(text)
        assert tok.eos_token_id not in ids  # encode adds no special tokens
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None

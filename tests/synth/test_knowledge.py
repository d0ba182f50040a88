"""The knowledge base: deterministic by seed, disjoint sources, questions whose answers the documents state."""

import pytest

from slmforge.synth.knowledge import ATTRIBUTES, DOMAINS, KnowledgeBase, candidates


def test_deterministic_by_seed_and_different_across_seeds():
    a, b, c = KnowledgeBase(30, 3, seed=1), KnowledgeBase(30, 3, seed=1), KnowledgeBase(30, 3, seed=2)
    assert a.documents() == b.documents() and a.questions() == b.questions()
    assert a.validation_documents() == b.validation_documents()
    assert a.entities != c.entities and a.questions() != c.questions()


def test_sources_are_disjoint_and_cover_every_fact():
    kb = KnowledgeBase(31, 4, seed=0, num_phrasings=3)
    assert kb.sources == [0, 1, 2, 3] and len(set(kb.entities)) == 31
    per_source = [kb.questions(s) for s in kb.sources]
    assert sorted(q for qs in per_source for q in qs) == sorted(kb.questions())
    assert len(kb.questions()) == 31 * len(ATTRIBUTES)
    names = [{p for p, _ in qs} for qs in per_source]
    for s, docs in enumerate(kb.documents(s) for s in kb.sources):
        assert len(docs) == 3 * len(kb._members(s))
        # a source's documents never mention another source's entities
        others = {e for i, e in enumerate(kb.entities) if kb.source_of(i) != s}
        assert not any(f"{e} " in d or f"{e}." in d for d in docs for e in others)
    assert all(not (names[i] & names[j]) for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(ValueError, match="source must be one of 0..3"):
        kb.documents(4)


def test_every_answer_is_stated_in_training_and_validation_documents():
    kb = KnowledgeBase(12, 2, seed=3)
    train, val = " ".join(kb.documents()), kb.validation_documents()
    for prompt, answer in kb.questions():
        assert f"{prompt} {answer}." in train  # phrasing 0 is in the training documents
    for i, (entity, facts) in enumerate(zip(kb.entities, kb.facts)):
        doc = val[i]  # one per entity, in entity order
        assert entity in doc and all(v in doc for v in facts.values())
    # validation text is new: no held-out biography equals a training one
    assert not set(val) & set(kb.documents())


def test_candidates_name_the_attribute():
    assert candidates("blue") == ATTRIBUTES["color"][0] and "baker" in candidates("painter")
    with pytest.raises(ValueError, match="not a value"):
        candidates("Zorava")


def test_domains_give_each_source_its_own_kind_and_vocabulary():
    kinds = ["medicine", "astronomy", "finance"]
    kb = KnowledgeBase(30, 3, seed=0, num_phrasings=2, domains=kinds)
    assert kb.domains == kinds and KnowledgeBase(6, 2).domains == ["people", "people"]
    words = []
    for s, kind in enumerate(kinds):
        attributes = DOMAINS[kind][1]
        assert len(kb.questions(s)) == 10 * len(attributes) and len(kb.documents(s)) == 20
        for prompt, answer in kb.questions(s):
            assert answer in candidates(answer) and candidates(answer) in [v for v, _ in attributes.values()]
            assert f"{prompt} {answer}." in " ".join(kb.documents(s))
        words.append({w for d in kb.documents(s) for w in d.replace(".", " ").split()})
    # Distinct domains: each shares only a few words with another (articles, "of", "is", ...).
    assert all(len(words[i] & words[j]) < 15 for i in range(3) for j in range(i + 1, 3))
    assert kb.entities[1].startswith("Planet ") and kb.entities[2].endswith(" Corp")
    with pytest.raises(ValueError, match="domains must name"):
        KnowledgeBase(6, 2, domains=["medicine"])
    with pytest.raises(ValueError, match="domains must name"):
        KnowledgeBase(6, 1, domains=["law"])

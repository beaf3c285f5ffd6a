"""pipelines.dedup: exact keys, MinHash signatures, verified near-duplicate pairs, clusters."""

from __future__ import annotations

import random
from itertools import combinations

import numpy as np
import pytest

from pipelines import dedup
from pipelines.dedup import (
    cluster,
    conversation_text,
    exact_key,
    lsh_params,
    minhash_signatures,
    near_duplicate_pairs,
)
from tests.conftest import LONG_SYSTEM_PROMPT


def shingles(t: str, k: int = 3) -> set[tuple[str, ...]]:
    w = t.split()
    return {tuple(w[i : i + k]) for i in range(max(1, len(w) - k + 1))}


def jaccard(a: str, b: str, k: int = 3) -> float:
    """Reference word k-shingle Jaccard, written independently of the vectorised code."""
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


def words(n: int, rng: random.Random, vocab: int = 3000) -> list[str]:
    return [f"w{rng.randrange(vocab)}" for _ in range(n)]


def edited(ws: list[str], positions: list[int]) -> str:
    out = list(ws)
    for p in positions:
        out[p] = "changed"
    return " ".join(out)


def test_conversation_text_normalises_case_whitespace_and_keeps_roles():
    row = {"messages": [{"role": "user", "content": "  Hello\n\tWORLD  "}, {"role": "assistant", "content": "Hi!"}]}
    assert conversation_text(row) == "user: hello world assistant: hi!"
    swapped = {"messages": [{"role": "assistant", "content": "Hello world"}, {"role": "user", "content": "hi!"}]}
    assert conversation_text(swapped) != conversation_text(row)


def test_exact_key_is_stable_hex_and_discriminates():
    assert exact_key("a b") == exact_key("a b")
    assert exact_key("a b") != exact_key("a  b")
    assert len(exact_key("x")) == 32 and int(exact_key("x"), 16) >= 0


def test_signatures_shape_dtype_and_determinism():
    texts = ["the quick brown fox jumps", "lorem ipsum dolor sit amet", ""]
    sig = minhash_signatures(texts, num_perm=64)
    assert sig.shape == (3, 64) and sig.dtype == np.uint32
    assert np.array_equal(sig, minhash_signatures(texts, num_perm=64))
    assert not np.array_equal(sig, minhash_signatures(texts, num_perm=64, seed=2))
    assert (sig[2] == np.iinfo(np.uint32).max).all()  # empty text: no shingle


def test_signature_of_a_text_does_not_depend_on_its_batch(monkeypatch):
    rng = random.Random(0)
    texts = [" ".join(words(rng.randint(0, 30), rng)) for _ in range(60)] + ["a", "a b", "x y z"]
    alone = np.vstack([minhash_signatures([t]) for t in texts])
    monkeypatch.setattr(dedup, "_BATCH_BYTES", 200)  # many small batches with short documents at the edges
    assert np.array_equal(minhash_signatures(texts), alone)
    # a 2-word document's one shingle must not take words from the next document
    assert np.array_equal(minhash_signatures(["a b", "c d e"])[0], minhash_signatures(["a b", "x y"])[0])


def test_separators_are_any_ascii_whitespace():
    assert np.array_equal(minhash_signatures(["a  b\tc\nd"]), minhash_signatures(["a b c d"]))


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(1)
    base = words(200, rng)
    pairs = [(" ".join(base), edited(base, list(range(0, 200, step)))) for step in (10, 25, 50)]
    sig = minhash_signatures([t for p in pairs for t in p], num_perm=256)
    for k, (a, b) in enumerate(pairs):
        estimate = float((sig[2 * k] == sig[2 * k + 1]).mean())
        assert abs(estimate - jaccard(a, b)) < 0.1, (estimate, jaccard(a, b))


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.8, 0.85, 0.9, 0.95])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_lsh_params_fit_and_catch_pairs_at_the_threshold(threshold, num_perm):
    bands, rows = lsh_params(threshold, num_perm)
    assert bands * rows <= num_perm
    assert 1 - (1 - threshold**rows) ** bands >= 0.99


def test_near_pairs_found_verified_and_dissimilar_not_paired():
    rng = random.Random(2)
    a = words(60, rng)
    texts = [" ".join(a), edited(a, [30]), " ".join(words(60, rng)), edited(a, [5, 20, 35, 50])]
    pairs = near_duplicate_pairs(texts, threshold=0.85)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert pairs[0][2] == pytest.approx(jaccard(texts[0], texts[1]))
    lower = {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold=0.6)}
    assert lower == {(0, 1), (0, 3)}  # 4 edits: Jaccard 0.67 with the original, 0.59 with text 1
    assert jaccard(texts[1], texts[3]) < 0.6 < jaccard(texts[0], texts[3])


def test_near_pairs_match_brute_force_on_a_random_set():
    rng = random.Random(3)
    texts = [" ".join(words(rng.randint(15, 80), rng, vocab=500)) for _ in range(150)]
    for _ in range(50):
        src = texts[rng.randrange(150)].split()
        texts.append(edited(src, rng.sample(range(len(src)), rng.randint(1, 4))))
    threshold = 0.7
    sets = [shingles(t) for t in texts]
    truth = {(i, j) for i, j in combinations(range(len(texts)), 2)
             if len(sets[i] & sets[j]) >= threshold * len(sets[i] | sets[j])}
    found = {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold)}
    assert len(truth) > 20
    assert found <= truth  # verified: never a pair below the threshold
    assert len(found) / len(truth) >= 0.95


def test_identical_copies_pair_with_the_first_only_and_empty_texts_never_pair():
    texts = ["same words here now", "", "same words here now", "", "same words here now"]
    assert near_duplicate_pairs(texts, 0.9) == [(0, 2, 1.0), (0, 4, 1.0)]


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_near_pairs_reject_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(["a b c"], threshold)


def test_cluster_labels_are_the_smallest_index_and_transitive():
    rng = random.Random(4)
    a = words(40, rng)
    b = edited(a, [10])
    c = edited(b.split(), [30])  # near b, not near a at 0.8: joins a's group through b
    other = " ".join(words(40, rng))
    texts = [other, " ".join(a), b, c, other, " ".join(words(40, rng))]
    assert jaccard(texts[1], c) < 0.8 <= min(jaccard(texts[1], b), jaccard(b, c))
    assert cluster(texts, 0.8) == [0, 1, 1, 1, 0, 5]


def test_results_are_deterministic_across_calls():
    rng = random.Random(5)
    base = [words(50, rng) for _ in range(30)]
    texts = [" ".join(w) for w in base] + [edited(w, [3]) for w in base[:10]]
    first = near_duplicate_pairs(texts, 0.8)
    assert first == near_duplicate_pairs(texts, 0.8)
    assert len(first) == 10


# ------------------------------------------------- issue 12: template text is not evidence of duplication


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


SYSTEM = LONG_SYSTEM_PROMPT
PAIRS = [("Do you rent tandem bikes?", "Yes, we have two tandems you can book."),
         ("Can I return the bike in Voss?", "No, every bike has to come back to the Bergen shop."),
         ("Is a helmet included?", "Yes, each rental comes with a helmet at no extra cost."),
         ("Can I pay by card?", "Yes, we accept all major cards and mobile payments."),
         ("Do you open on Sundays?", "No, we are closed on Sundays and public holidays.")]


def test_conversation_text_folds_compatibility_characters():
    assert conversation_text(chat(("user", "ＡＢＣ ﬁle"), ("assistant", "ok"))) == "user: abc file assistant: ok"


@pytest.mark.parametrize("row", [
    chat(("system", "Be brief."), ("user", "  Hello\n\n\tWORLD  "), ("assistant", "Hi!\nBye.")),
    chat(("user", "ＡＢＣ"), ("assistant", "x\u3000y")),
    chat(("user", "q"), ("assistant", "a"), ("tool", "{}"), ("assistant", "b")),
])
def test_conversation_lines_hold_the_same_words_as_conversation_text(row):
    assert dedup.whole_text(dedup.conversation_lines(row)) == conversation_text(row)


def test_template_lines_counts_distinct_rows():
    rows = [chat(("system", SYSTEM), ("user", q), ("assistant", a)) for q, a in PAIRS[:2]]
    rows.append(rows[0])  # an exact copy does not make a line frequent
    lines = [dedup.conversation_lines(r) for r in rows]
    template = dedup.template_lines(lines)
    assert hash("s" + conversation_text(chat(("system", SYSTEM)))[len("system: "):]) in template  # system: 2 rows
    assert not any(hash("u" + q.lower()) in template for q, _ in PAIRS)
    shared = [dedup.conversation_lines(chat(("user", f"Classify this.\n{q}"), ("assistant", a))) for q, a in PAIRS]
    assert hash("uclassify this.") in dedup.template_lines(shared, share=0.5)  # in 5 of 5 rows
    assert hash("uclassify this.") not in dedup.template_lines(shared[:2], share=0.5)  # 2 rows: fewer than 3


def test_a_shared_system_prompt_makes_no_pair_but_whole_text_would():
    rows = [chat(("system", SYSTEM), ("user", q), ("assistant", a)) for q, a in PAIRS]
    assert near_duplicate_pairs([conversation_text(r) for r in rows], 0.85)  # the fault of case 09
    lines = [dedup.conversation_lines(r) for r in rows]
    assert dedup.similar_pairs(lines, 0.85) == [] and dedup.similar_pairs(lines, 0.6) == []


INLINE = ("You are the support agent of a bike rental shop in Bergen. Read the customer's message and answer it "
          "politely in one or two sentences, without promising refunds or dates. The message:")
QUESTIONS = ["where is my parcel", "can I change my password", "the app crashes on start", "I was charged twice",
             "how do I export data", "do you ship to Canada", "my coupon does not work", "can I add a second user",
             "the invoice has a typo", "how to delete my account", "is there a dark mode", "the page loads slowly",
             "I forgot my username", "can I pay by invoice", "the download link expired", "how do I cancel",
             "the PDF is blank", "can I get a receipt", "my order arrived damaged", "is my data encrypted"]


def test_a_template_inside_one_line_makes_no_pair():
    """Siblings of case 09: the instruction and the question on one line; template_lines cannot see it, the
    shingles found in many rows (template_shingles) are set aside instead."""
    rows = [chat(("user", f"{INLINE} {q}"), ("assistant", f"Sorry about that: {q.split()[-1]}.")) for q in QUESTIONS]
    assert near_duplicate_pairs([conversation_text(r) for r in rows], 0.6)  # the fault: 20 pairs at 0.6
    lines = [dedup.conversation_lines(r) for r in rows]
    assert dedup.similar_pairs(lines, 0.85) == [] and dedup.similar_pairs(lines, 0.6) == []
    # a real near copy under the same template is still one
    rows.append(chat(("user", f"{INLINE} where is my parcel please"), ("assistant", "Sorry about that: parcel.")))
    lines = [dedup.conversation_lines(r) for r in rows]
    assert [(i, j) for i, j, _ in dedup.similar_pairs(lines, 0.6)] == [(0, 20)]


def test_template_shingles_need_ten_distinct_rows():
    """A few near copies of one text share all their shingles; below `least` distinct rows nothing is template."""
    texts = [conversation_text(chat(("user", f"{INLINE} {q}"))) for q in QUESTIONS]
    assert len(dedup.template_shingles(texts[:9] * 5, 3)) == 0  # 9 distinct rows, copies do not count
    found = dedup.template_shingles(texts, 3)
    assert len(found) == len(INLINE.split()) + 1 - 3 + 1  # the instruction's shingles, with "user:" in front
    assert not dedup.template_shingles(texts, 3, share=0.9) - found


def test_real_near_duplicates_stay_pairs_and_pairs_only_shrink():
    ticket = "Subject: Missing package\n\nHello,\nOnly one of the two packages in shipment LX1 was delivered."
    variant = ticket.replace("Hello,", "Hi again, Hello,")
    rows = [chat(("system", SYSTEM), ("user", q), ("assistant", a)) for q, a in PAIRS]
    rows += [chat(("system", SYSTEM), ("user", ticket), ("assistant", "shipping")),
             chat(("system", SYSTEM), ("user", variant), ("assistant", "shipping"))]
    lines = [dedup.conversation_lines(r) for r in rows]
    pairs = dedup.similar_pairs(lines, 0.85)
    assert [(i, j) for i, j, _ in pairs] == [(5, 6)]
    # Their own content (system prompt set aside) is less similar than the whole text, and shorter: a bar at the
    # threshold itself would veto them; the bar is a fraction of it (own_ratio), near 0 still vetoes.
    assert dedup.similar_pairs(lines, 0.85, own_ratio=1.0) == []
    whole = {(i, j) for i, j, _ in near_duplicate_pairs([conversation_text(r) for r in rows], 0.6)}
    assert {(i, j) for i, j, _ in dedup.similar_pairs(lines, 0.6)} <= whole


def test_components_label_by_smallest_member():
    assert dedup.components(5, [(3, 4, 1.0), (1, 3, 0.9)]) == [0, 1, 2, 1, 1]

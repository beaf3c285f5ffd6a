"""Exact and near-duplicate detection, shared by the clean stage (drop duplicates) and the split stage
(keep near-duplicates in one split). A library: no file I/O, no stage of its own.

    from pipelines.dedup import conversation_text, exact_key, near_duplicate_pairs, cluster

Conversations are compared with similar_pairs: near duplicates of the whole conversation (as folded by
conversation_text) that stay near duplicates once the template text both share is set aside
(template_lines for whole lines, template_shingles inside a line), so rows that only share a long system
prompt or an instruction template are not duplicates.

Near duplicates are found the classic way (MinHash + LSH banding, "Mining of Massive Datasets" ch. 3)
and every candidate pair is then verified with the exact Jaccard similarity of its two shingle sets,
so the reported pairs have no MinHash estimation error: precision is exact, recall is the LSH
probability of a pair at the threshold ending in one bucket (>= 0.99 by construction, `lsh_params`).

Why not datasketch (a dependency, and the baseline of bench/bench_dedup.py): it hashes every shingle
with SHA-1 in Python and builds one MinHash object per document. Here one batch of documents is hashed
at once with numpy: word hashes from a polynomial prefix sum over the batch's bytes, shingle hashes from
the word hashes, then each block of permutations is applied to the whole concatenated shingle array and
reduced per document with np.minimum.reduceat. The permutation scheme is datasketch's "affine32"
(a * h + b mod 2**32 with odd a after a MurmurHash3 finaliser), in uint32.

Memory stays bounded: documents go through in batches of ~`_BATCH_BYTES` bytes; near_duplicate_pairs
keeps only one uint64 key per band per document (bands * 8 bytes, 128 B for 16 bands), not signatures.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

_U64 = np.uint64
_MAX32 = np.uint32(0xFFFFFFFF)
# Bytes of text hashed per batch: word hashing needs ~34 bytes of arrays per text byte, ~34 MB at 1 MB.
_BATCH_BYTES = 1 << 20
# Permutations applied per pass (8 measured fastest of 4-128); (perms, shingles) uint32 buffer, ~6 MB per batch.
_PERM_BLOCK = 8
# Bytes <= 0x20 (space, tab, newline, other ASCII controls) separate words; conversation_text has already
# collapsed Unicode whitespace to " ". A comparison is ~30x faster than a lookup table here.
_SEPARATOR_MAX = np.uint8(0x20)
# Odd multiplier of the byte-level polynomial hash; odd makes it invertible mod 2**64 (see _word_hashes).
_POLY = 0x100000001B3
_POLY_INV = pow(_POLY, -1, 1 << 64)
# Odd constants weighting the k words of a shingle, so "a b c" and "c b a" hash differently.
_SHINGLE_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
     0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
    dtype=_U64,
)


def _fold(text: str) -> str:
    """NFKC then casefold: full-width letters, ligatures and case do not make two texts different. Only the
    comparison folds them; the training text keeps what clean.unicode_form left (NFC by default)."""
    return (text if text.isascii() else unicodedata.normalize("NFKC", text)).casefold()


def conversation_text(row: dict[str, Any]) -> str:
    """The text that identifies a row (exact duplicates): "role: content" of every message, NFKC-folded,
    casefolded, whitespace collapsed."""
    joined = " ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return " ".join(_fold(joined).split())


_ROLE_TAG = {"system": "s", "user": "u", "assistant": "a", "tool": "t"}
_TAG_ROLE = {tag: role for role, tag in _ROLE_TAG.items()}


def conversation_lines(row: dict[str, Any]) -> str:
    """The row as tagged lines, the input of similar_pairs: per message a line with its role's letter in
    upper case ("U"), then each non-blank line of its content, folded and whitespace-collapsed, prefixed by
    the letter in lower case ("uhello world"). One string per row: about as small as conversation_text."""
    out: list[str] = []
    for m in row["messages"]:
        tag = _ROLE_TAG.get(m["role"], "u")
        out.append(tag.upper())
        for line in _fold(m["content"]).split("\n"):
            if words := line.split():
                out.append(tag + " ".join(words))
    return "\n".join(out)


def template_lines(lines: Sequence[str], share: float = 0.1, least: int = 3,
                   wholes: Sequence[str] | None = None) -> set[int]:
    """hash() of the tagged lines (conversation_lines) that are template text rather than a row's own content:
    a system-message line found in 2 or more distinct rows, any other line in at least `least` and at least
    `share` of the distinct rows (an instruction template, a canned sign-off). Counted once per row, over
    distinct rows (exact copies do not make a line frequent; `wholes`, whole_text of each, says which are
    copies), with numpy: 8 bytes a line. Of copies that differ only in line breaks the smallest form counts,
    so the result depends on the set of distinct rows only, not on their order or multiplicity.

    Lines that repeat across documents are the classic signature of boilerplate (CCNet, Wenzek et al., LREC
    2020, drops such paragraphs). A system prompt is context by design, so sharing one is never evidence.
    """
    chosen: dict[str, str] = {}
    for whole, form in zip(wholes if wholes is not None else map(whole_text, lines), lines, strict=True):
        if whole not in chosen or form < chosen[whole]:
            chosen[whole] = form
    distinct = list(chosen.values())
    system: list[int] = []
    other: list[int] = []
    for form in distinct:
        for line in set(form.split("\n")):
            if len(line) > 1:
                (system if line[0] == "s" else other).append(hash(line))
    found: set[int] = set()
    for hashes, minimum in ((system, 2), (other, max(least, math.ceil(share * len(distinct))))):
        if hashes:
            values, counts = np.unique(np.array(hashes, dtype=np.int64), return_counts=True)
            found.update(values[counts >= minimum].tolist())
    return found


def template_shingles(wholes: Sequence[str], shingle_size: int, share: float = 0.1, least: int = 10) -> set[int]:
    """Hashes of the word shingles (as near_duplicate_pairs hashes them) found in at least `least` and at least
    `share` of the distinct texts `wholes` (whole_text of each row): template text inside a line, such as an
    instruction written before every question on the same line, which template_lines cannot see.

    The bar is higher than template_lines' (10 rows, not 3): a few near copies of one text share all their
    shingles, and a small file must not see them as template. Counted once per distinct text, with numpy.
    """
    distinct = sorted(set(wholes))
    if len(distinct) < least:
        return set()
    per_row = []
    for _, batch in _batches(distinct):
        hashes, offsets = _shingle_hashes(batch, shingle_size)
        per_row += [np.unique(hashes[offsets[i]:offsets[i + 1]]) for i in range(len(batch))]
    values, counts = np.unique(np.concatenate(per_row), return_counts=True)
    return set(values[counts >= max(least, math.ceil(share * len(distinct)))].tolist())


def _line_hashes(form: str) -> set[int]:
    return {hash(line) for line in form.split("\n") if len(line) > 1}


def without_lines(form: str, drop: set[int]) -> str:
    """The words of conversation_text() of `form` (conversation_lines) less the lines whose hash is in `drop`;
    a message left with no line is left out with its role."""
    parts: list[str] = []
    for message in _messages(form):
        kept = [line[1:] for line in message[1:] if hash(line) not in drop]
        if kept or not drop:
            parts.append(f"{_TAG_ROLE[message[0]]}:")
            parts.extend(kept)
    return " ".join(parts)


def whole_text(form: str) -> str:
    """The words of conversation_text() of the row whose conversation_lines() is `form` (same shingles)."""
    return without_lines(form, set())


def _messages(form: str) -> list[tuple[str, ...]]:
    """conversation_lines() back into messages: (tag, line, line, ...) per message."""
    messages: list[list[str]] = []
    for line in form.split("\n"):
        if len(line) == 1:
            messages.append([line.lower()])
        elif messages:
            messages[-1].append(line)
    return [tuple(m) for m in messages]


def exact_digest(text: str) -> bytes:
    """128-bit BLAKE2b of the text: collision-free in practice and ~3x faster than SHA-256 in CPython."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def exact_key(text: str) -> str:
    """exact_digest as hex: the printable key (a group name in the split files)."""
    return exact_digest(text).hex()


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: an avalanching bijection (uint64 arithmetic wraps on purpose)."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


_POWER_TABLES: list[tuple[np.ndarray, np.ndarray]] = []  # one pair of tables, grown on demand


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """POLY**j and POLY**-j mod 2**64 for j < at least n (cumprod of uint64 wraps, which is the modulo).

    Kept between calls (16 bytes per entry, 16 MB for the usual 1 MB batch) and grown to the next power
    of two when a batch (a single long document) needs more.
    """
    if not _POWER_TABLES or len(_POWER_TABLES[0][0]) < n:
        size = 1 << max(20, (n - 1).bit_length())
        pw = np.cumprod(np.full(size, _POLY, dtype=_U64)) * _U64(_POLY_INV)  # POLY**j, starting at j = 0
        inv = np.cumprod(np.full(size, _POLY_INV, dtype=_U64)) * _U64(_POLY)
        _POWER_TABLES[:] = [(pw, inv)]
    return _POWER_TABLES[0]


def _word_hashes(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word of a batch of documents at once.

    Returns (word hashes uint64 (W,), index of each document's first word int64 (n + 1,)). A word's hash
    is the polynomial sum(byte_j * POLY**(j - start)) mod 2**64, read off a prefix sum over the whole
    batch as (prefix[end] - prefix[start]) * POLY**-start, then mixed with fmix64.
    """
    buf = np.frombuffer(b" ".join(encoded) + b" ", dtype=np.uint8)  # one space between documents
    size = len(buf)
    ws = buf <= _SEPARATOR_MAX
    starts = np.flatnonzero(~ws & np.concatenate(([True], ws[:-1])))
    ends = np.flatnonzero(~ws & np.concatenate((ws[1:], [True]))) + 1
    pw, inv = _powers(size)
    prefix = np.zeros(size + 1, dtype=_U64)
    np.cumsum(np.multiply(buf, pw[:size], dtype=_U64), out=prefix[1:])  # words hold no zero byte
    words = _fmix64((prefix[ends] - prefix[starts]) * inv[starts])
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    doc_bounds = np.concatenate(([0], np.cumsum(lengths + 1)))  # byte offset of each document, + the end
    return words, np.searchsorted(starts, doc_bounds)


def _shingle_hashes(encoded: Sequence[bytes], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word k-shingles of each document, concatenated.

    Returns (hashes uint64 (S,), offsets int64 (n + 1,)): document i owns hashes[offsets[i]:offsets[i+1]].
    A document with fewer than k words has one shingle of all its words; an empty one has none.
    """
    k = shingle_size
    if not 1 <= k <= len(_SHINGLE_MULT):
        raise ValueError(f"shingle_size must be in 1..{len(_SHINGLE_MULT)}, got {k}")
    words, word_off = _word_hashes(encoded)
    n_words = np.diff(word_off)
    # A shingle starts at every word but the last k - 1 of its document (the first word always starts one).
    is_start = np.ones(len(words) + 1, dtype=bool)
    for t in range(1, k):
        last = word_off[1:] - t
        is_start[last[n_words > t]] = False
    first = np.flatnonzero(is_start[:-1])
    padded = np.concatenate((words, np.zeros(k, dtype=_U64)))
    h = padded[first] * _SHINGLE_MULT[0]
    for j in range(1, k):
        h += padded[first + j] * _SHINGLE_MULT[j]
    n_shingles = np.where(n_words >= k, n_words - k + 1, np.minimum(n_words, 1))
    offsets = np.concatenate(([0], np.cumsum(n_shingles)))
    short = np.flatnonzero((n_words > 0) & (n_words < k))
    if len(short):  # their one shingle ran into the next document's words: recompute it with those masked
        pos = word_off[short]
        fixed = padded[pos] * _SHINGLE_MULT[0]
        for j in range(1, k):
            fixed += np.where(j < n_words[short], padded[pos + j] * _SHINGLE_MULT[j], _U64(0))
        h[offsets[short]] = fixed
    return _fmix64(h), offsets


def _batches(texts: Sequence[str]) -> Iterator[tuple[int, list[bytes]]]:
    """(first index, encoded texts) in batches of at most _BATCH_BYTES bytes (or one longer text), in order."""
    start, batch, size = 0, [], 0
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        if batch and size + len(data) + 1 > _BATCH_BYTES:
            yield start, batch
            start, batch, size = i, [], 0
        batch.append(data)
        size += len(data) + 1
    if batch:
        yield start, batch


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Affine permutations h -> a * h + b mod 2**32; a odd makes each one a bijection (no collisions)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a[:, None], b[:, None]  # (num_perm, 1) each, to broadcast over shingles


def _signatures_of(encoded: Sequence[bytes], num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32 of one batch; an empty document's row is all 0xFFFFFFFF."""
    hashes, offsets = _shingle_hashes(encoded, shingle_size)
    sig = np.full((len(encoded), num_perm), _MAX32, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    if not len(nonempty):
        return sig
    h32 = (hashes >> _U64(32)).astype(np.uint32)[None, :]  # fmix64 output: the top 32 bits are uniform
    starts = offsets[nonempty]
    a, b = _permutations(num_perm, seed)
    block = np.empty((min(_PERM_BLOCK, num_perm), h32.shape[1]), dtype=np.uint32)  # (perms, shingles)
    for p in range(0, num_perm, _PERM_BLOCK):
        q = min(p + _PERM_BLOCK, num_perm)
        out = block[: q - p]
        np.multiply(a[p:q], h32, out=out)  # uint32 wraps: the mod 2**32 of the affine map
        np.add(out, b[p:q], out=out)
        sig[nonempty, p:q] = np.minimum.reduceat(out, starts, axis=1).T
    return sig


def minhash_signatures(
    texts: Sequence[str], num_perm: int = 128, shingle_size: int = 3, seed: int = 1
) -> np.ndarray:
    """MinHash signature of each text's word shingles: (n, num_perm) uint32, deterministic for a seed.

    Texts are split on ASCII whitespace as given; pass conversation_text() output for case-insensitive
    matching. An empty text gets an all-0xFFFFFFFF row.
    """
    sig = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start, batch in _batches(texts):
        sig[start : start + len(batch)] = _signatures_of(batch, num_perm, shingle_size, seed)
    return sig


def _collision_probability(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Probability that two texts of Jaccard s share at least one of `bands` buckets of `rows` values."""
    return 1.0 - (1.0 - s**rows) ** bands


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm for a threshold.

    Every candidate is verified exactly, so a false positive costs only a set intersection while a false
    negative is a missed duplicate: among the (b, r) whose collision probability at the threshold is
    >= 0.99 (if any), pick the one with the fewest expected candidates below the threshold.
    """
    s_low = np.linspace(0.0, threshold, 201)
    best: tuple[float, float, int, int] | None = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        recall = float(_collision_probability(np.float64(threshold), bands, rows))
        false_pos = float(np.trapezoid(_collision_probability(s_low, bands, rows), s_low))
        key = (0.0 if recall >= 0.99 else 1.0 - recall, false_pos, bands, rows)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[3]


def _band_keys(
    texts: Sequence[str], bands: int, rows: int, num_perm: int, shingle_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, bands) uint64 hash of each band of each signature, and (n,) bool "has at least one shingle".

    Signatures are dropped batch by batch. A band's key is fmix64 of a weighted sum of its values with
    random odd 64-bit weights: distinct bands collide with probability ~2**-64, and a collision only adds
    a candidate that the exact verification rejects.
    """
    weights = np.random.default_rng(0).integers(0, 1 << 63, size=rows, dtype=np.uint64) * _U64(2) + _U64(1)
    keys = np.empty((len(texts), bands), dtype=_U64)
    nonempty = np.empty(len(texts), dtype=bool)
    for start, batch in _batches(texts):
        sig = _signatures_of(batch, num_perm, shingle_size, seed=1)[:, : bands * rows]
        stop = start + len(batch)
        nonempty[start:stop] = sig[:, 0] != _MAX32  # a shingle hashes to MAX32 under all perms: ~2**-4096
        grouped = sig.reshape(len(batch), bands, rows).astype(_U64) * weights  # (n, bands, rows)
        keys[start:stop] = _fmix64(grouped.sum(axis=2, dtype=_U64))
    return keys, nonempty


def _candidate_pairs(keys: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """(m, 2) int64 unique pairs i < j of documents that share a bucket in any band."""
    found: list[np.ndarray] = []
    idx = np.flatnonzero(usable)
    for band in range(keys.shape[1]):
        order = idx[np.argsort(keys[idx, band], kind="stable")]
        sorted_keys = keys[order, band]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        # Runs of equal keys are buckets; every pair inside a bucket is a candidate, built per bucket size.
        run_start = np.flatnonzero(np.concatenate(([True], ~same)))
        run_len = np.diff(np.concatenate((run_start, [len(order)])))
        for length in np.unique(run_len[run_len > 1]).tolist():
            first, second = np.triu_indices(length, 1)  # all i < j within a bucket of this size
            starts = run_start[run_len == length][:, None]  # (buckets, 1)
            found.append(np.stack((order[starts + first].ravel(), order[starts + second].ravel()), axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    n = np.int64(len(keys))
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])  # 1-D unique: much faster than unique(axis=0)
    return np.stack((codes // n, codes % n), axis=1)


def _shingle_sets(texts: Sequence[str], shingle_size: int) -> list[frozenset[int]]:
    hashes, offsets = _shingle_hashes([t.encode("utf-8") for t in texts], shingle_size)
    return [frozenset(hashes[offsets[i] : offsets[i + 1]].tolist()) for i in range(len(texts))]


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float, num_perm: int = 128, shingle_size: int = 3
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) with i < j whose word-shingle sets have exact Jaccard >= threshold.

    Candidates come from LSH banding of MinHash signatures (recall at the threshold >= 0.99, more above
    it); each is verified with the exact Jaccard of the two shingle sets. Identical texts are reported
    once each against their first occurrence (jaccard 1.0), not as all pairs among the copies, so a text
    repeated m times costs m - 1 pairs, not m * (m - 1) / 2. Sorted by (i, j); deterministic.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    first_of: dict[str, int] = {}
    reps: list[int] = []  # index of the first occurrence of each distinct text
    result: list[tuple[int, int, float]] = []
    for i, text in enumerate(texts):
        j = first_of.setdefault(text, i)
        if j == i:
            reps.append(i)
        elif text.split():
            result.append((j, i, 1.0))
    unique = [texts[i] for i in reps]
    bands, rows = lsh_params(threshold, num_perm)
    keys, usable = _band_keys(unique, bands, rows, num_perm, shingle_size)
    candidates = _candidate_pairs(keys, usable)
    if len(candidates):
        involved = np.unique(candidates)
        sets = dict(zip(involved.tolist(), _shingle_sets([unique[i] for i in involved], shingle_size), strict=True))
        for a, b in candidates.tolist():
            sa, sb = sets[a], sets[b]
            if min(len(sa), len(sb)) < threshold * max(len(sa), len(sb)):
                continue  # Jaccard <= smaller / larger: below the threshold without intersecting
            inter = len(sa & sb)
            jaccard = inter / (len(sa) + len(sb) - inter)
            if jaccard >= threshold:
                result.append((reps[a], reps[b], jaccard))
    result.sort()
    return result


def similar_pairs(lines: Sequence[str], threshold: float, num_perm: int = 128, shingle_size: int = 3,
                  boilerplate_share: float = 0.1, own_ratio: float = 0.6) -> list[tuple[int, int, float]]:
    """Near-duplicate conversations: pairs (i, j, jaccard), i < j, of conversation_lines() whose word-shingle
    Jaccard is >= threshold on the whole conversation (near_duplicate_pairs: LSH candidates, verified
    exactly, as conversation_text was always compared) and whose own content is >= own_ratio * threshold
    similar: their Jaccard once the template text both contain (template_lines) is set aside, verified
    exactly. jaccard is the whole-text Jaccard.

    The second test is a veto: two rows that share one long system prompt or an instruction template but differ in
    their own question and answer (own Jaccard near 0) are not duplicates, however similar the whole texts. Template
    text is whole lines (template_lines) and, inside a line, the word shingles that template_shingles finds in many
    rows (an instruction and its question on one line); both are set aside only where the two rows share them. The
    bar is a fraction of the threshold because setting aside shared text also shortens the texts, and on short texts
    one different word costs `shingle_size` shingles: the same ticket with another greeting scores ~0.8 on its own
    content against 0.88 whole, variants of one tool-call dialogue ~0.58 against 0.62. The veto only removes pairs,
    so leaving template text out never makes two rows duplicates; and a pair at a higher threshold meets the bar of
    any lower one, so the split's groups (split.group_threshold) still hold every pair its leakage check looks for.
    Sorted by (i, j).
    """
    wholes = [whole_text(form) for form in lines]
    pairs = near_duplicate_pairs(wholes, threshold, num_perm, shingle_size)
    if not pairs:
        return []
    template = template_lines(lines, boilerplate_share, wholes=wholes)
    in_line = template_shingles(wholes, shingle_size, boilerplate_share)
    whole_sets: dict[int, frozenset[int]] = {}
    if in_line:
        involved = sorted({k for i, j, _ in pairs for k in (i, j)})
        whole_sets = dict(zip(involved, _shingle_sets([wholes[k] for k in involved], shingle_size), strict=True))
    hashes: dict[int, set[int]] = {}
    out: list[tuple[int, int, float]] = []
    recheck: list[tuple[int, int, float, frozenset[int]]] = []
    texts: list[str] = []
    for i, j, whole in pairs:
        for k in (i, j):
            if k not in hashes:
                hashes[k] = _line_hashes(lines[k]) & template
        shared = hashes[i] & hashes[j]
        shared_shingles = whole_sets[i] & whole_sets[j] & in_line if in_line else frozenset()
        if not shared and not shared_shingles:
            out.append((i, j, whole))  # no template text in common: the whole-text Jaccard stands
            continue
        recheck.append((i, j, whole, shared_shingles))
        texts += [without_lines(lines[i], shared), without_lines(lines[j], shared)]
    sets = _shingle_sets(texts, shingle_size) if texts else []
    for n, (i, j, whole, drop) in enumerate(recheck):
        a, b = sets[2 * n] - drop, sets[2 * n + 1] - drop
        inter = len(a & b)
        union = len(a) + len(b) - inter
        own = inter / union if union else 1.0  # nothing of their own: identical apart from shared template
        if own >= own_ratio * threshold:
            out.append((i, j, whole))
    out.sort()
    return out


def components(n: int, pairs: Iterable[tuple[int, int, float]]) -> list[int]:
    """A group label for each of n items: connected components of `pairs`, labelled by their smallest index,
    so an item in no pair is labelled with its own index and the labels do not depend on the pairs' order."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps trees shallow
            x = parent[x]
        return x

    for i, j, _ in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the smaller index stays root: root == smallest member
    return [root(i) for i in range(n)]


def cluster(texts: Sequence[str], threshold: float, num_perm: int = 128, shingle_size: int = 3) -> list[int]:
    """A group label per text: connected components of the verified near-duplicate pairs.

    The label is the smallest index in the group, so a text with no near duplicate is labelled with
    its own index and the labels do not depend on the order pairs are found in.
    """
    return components(len(texts), near_duplicate_pairs(texts, threshold, num_perm, shingle_size))


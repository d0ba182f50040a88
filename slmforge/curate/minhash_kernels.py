"""Compiled (numba) kernels for MinHash: shingle hashing and signatures, one pass over the bytes each.

They compute exactly what ``dedup.py``'s docstring defines and its ``shingles_ref`` / ``minhash_ref`` loops
check; ``tests/curate/test_dedup.py`` compares them on the same texts. Why compiled code: with numpy every step
(word edges, prefix sums, span hashes, the (permutations x shingles) products) is a separate pass over a large
temporary array, and shingling ran at ~90 MB per CPU-second; a fused loop keeps the working set in registers
and cache. Numba, not C: it installs as a wheel, compiles on first use (cached on disk), and the loops stay
readable Python.

Arithmetic is uint64 mod 2^64 (numba wraps like C). Every constant is cast to uint64 first: mixing uint64
with a Python int in numba gives a float64.
"""

from __future__ import annotations

import numba
import numpy as np

_B = np.uint64(0x9E3779B97F4A7C15)  # the polynomial base of dedup.py's span hash
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33, _S32 = np.uint64(33), np.uint64(32)
_ONE, _ZERO = np.uint64(1), np.uint64(0)
_SPACE = np.uint64(32)
_B_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))


@numba.njit(inline="always")
def _fmix64(h):
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    return h ^ (h >> _S33)


@numba.njit(inline="always")
def _windows(units, count, ngram, powers, top, inverse, hashes, m):
    """Emit the hashes of all n-unit windows of ``units[:count]`` (one of all of it when shorter), rolling:
    H_{i+1} = (H_i - u_i) * B^-1 + u_{i+n} * B^(n-1), so each window costs two multiplies whatever n is."""
    if count == 0:
        return m
    width = min(ngram, count)
    h = _ZERO
    for j in range(width):
        h += units[j] * powers[j]
    hashes[m] = _fmix64(h)
    m += 1
    for i in range(count - width):
        h = (h - units[i]) * inverse + units[i + width] * top
        hashes[m] = _fmix64(h)
        m += 1
    return m


@numba.njit(cache=True, nogil=True)
def shingle_kernel(buf, doc_bytes, is_word, lower, ngram, char):
    """Hash the shingles of documents ``buf[doc_bytes[d]:doc_bytes[d+1]]`` (UTF-8, lowercased but for ASCII, which
    ``lower`` folds here; each ends in a non-word byte). Returns (hashes uint64, offsets int64 (n+1,), exact uint64 (n,), num_words int64 (n,))."""
    n = len(doc_bytes) - 1
    powers = np.empty(ngram, np.uint64)
    p = _ONE
    for j in range(ngram):
        powers[j] = p
        p *= _B
    top, inverse = powers[ngram - 1], _B_INV
    hashes = np.empty(len(buf) + n, np.uint64)  # at most one shingle per unit, or one per document
    units = np.empty(len(buf) + 1, np.uint64)  # one document's words (word hashes) or joined bytes
    offsets = np.zeros(n + 1, np.int64)
    exact = np.empty(n, np.uint64)
    num_words = np.empty(n, np.int64)
    m = 0
    for d in range(n):
        count, words, acc, acc_power = 0, 0, _ZERO, _ONE
        i, end = doc_bytes[d], doc_bytes[d + 1]
        while i < end:
            if not is_word[buf[i]]:
                i += 1
                continue
            h, power = _ZERO, _ONE
            while is_word[buf[i]]:  # the document's last byte is a non-word byte, so this stops inside it
                c = np.uint64(lower[buf[i]])
                h += c * power
                power *= _B
                if char:
                    units[count] = c
                    count += 1
                i += 1
            w = _fmix64(h)
            acc += w * acc_power
            acc_power *= _B
            words += 1
            units[count] = _SPACE if char else w
            count += 1
        m = _windows(units, count, ngram, powers, top, inverse, hashes, m)
        offsets[d + 1] = m
        exact[d] = _fmix64(acc)
        num_words[d] = words
    return hashes[:m].copy(), offsets, exact, num_words


@numba.njit(cache=True, nogil=True)
def signature_kernel(x, offsets, a, b):
    """MinHash signatures (n, num_perm) uint32 of documents whose 32-bit shingles are ``x[offsets[d]:offsets[d+1]]``,
    with h_i(x) = (a_i x + b_i) mod 2^32. A document without shingles gets all 0xFFFFFFFF."""
    n, num_perm = len(offsets) - 1, len(a)
    sig = np.empty((n, num_perm), np.uint32)
    for d in range(n):
        doc = x[offsets[d]:offsets[d + 1]]
        for p in range(num_perm):  # shingles innermost: a min-reduction the compiler vectorises
            ap, bp, low = a[p], b[p], np.uint32(0xFFFFFFFF)
            for t in range(len(doc)):
                low = min(low, np.uint32(ap * doc[t] + bp))
            sig[d, p] = low
    return sig


@numba.njit(inline="always")
def _distinct(x):
    """Sorted distinct values of x (a copy)."""
    x = np.sort(x)
    kept = min(len(x), 1)
    for t in range(1, len(x)):
        if x[t] != x[t - 1]:
            x[kept] = x[t]
            kept += 1
    return x[:kept]


@numba.njit(cache=True, nogil=True)
def pair_jaccard(values_a, offsets_a, rows_a, values_b, offsets_b, rows_b):
    """Exact Jaccard of the sets of values (any order, repeats allowed): pair k is row ``rows_a[k]`` of (values_a, offsets_a) and row
    ``rows_b[k]`` of (values_b, offsets_b); two empty sets count as equal (1.0)."""
    out = np.empty(len(rows_a))
    for k in range(len(rows_a)):
        a = _distinct(values_a[offsets_a[rows_a[k]]:offsets_a[rows_a[k] + 1]])
        b = _distinct(values_b[offsets_b[rows_b[k]]:offsets_b[rows_b[k] + 1]])
        i = j = inter = 0
        while i < len(a) and j < len(b):
            if a[i] == b[j]:
                inter += 1
                i += 1
                j += 1
            elif a[i] < b[j]:
                i += 1
            else:
                j += 1
        union = len(a) + len(b) - inter
        out[k] = inter / union if union else 1.0
    return out

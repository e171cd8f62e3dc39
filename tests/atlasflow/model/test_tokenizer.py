from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from atlasflow.model.tokenizer import CLS, N_SPECIAL, Tokenizer, rank_order


def test_top_genes_bins_and_ties():
    tok = Tokenizer(n_genes=10, max_genes=4, n_bins=5)
    # cell 0: genes 0..5 with values 1..6; cell 1: ties; cell 2: nothing expressed; column 6 is not in the vocab
    X = sp.csr_matrix(np.array([
        [1, 2, 3, 4, 5, 6, 9],
        [2, 2, 0, 0, 0, 7, 0],
        [0, 0, 0, 0, 0, 0, 3],
    ], dtype=np.float32))
    columns = np.array([0, 1, 2, 3, 4, 5, -1])
    tokens, bins = tok.encode(X, columns)
    assert tokens.shape == bins.shape == (3, 5) and (tokens[:, 0] == CLS).all()
    # highest values first: genes 5, 4, 3, 2 (the unmapped column's 9 is ignored)
    assert list(tokens[0, 1:] - N_SPECIAL) == [5, 4, 3, 2]
    assert list(bins[0, 1:]) == sorted(bins[0, 1:], reverse=True) and bins[0, 1] == 4 and bins[0, 4] >= 1
    # ties: genes 0 and 1 both 2 -> same bin, in hashed order; gene 5 (7) first
    assert tokens[1, 1] - N_SPECIAL == 5 and set(tokens[1, 2:4] - N_SPECIAL) == {0, 1} and bins[1, 2] == bins[1, 3]
    assert tokens[1, 4] == 0 and bins[1, 4] == 0  # padding
    assert (tokens[2, 1:] == 0).all()


def test_deterministic_and_matches_a_per_cell_reference():
    rng = np.random.default_rng(0)
    X = sp.random(50, 300, density=0.2, random_state=1, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    columns = rng.permutation(300)
    tok = Tokenizer(n_genes=300, max_genes=32, n_bins=11)
    tokens, bins = tok.encode(X, columns)
    assert np.array_equal(tokens, tok.encode(X, columns)[0])
    for i in range(50):  # the chosen genes are exactly a top-32 by value of the cell
        row = X.getrow(i)
        vals = dict(zip(columns[row.indices], row.data, strict=True))
        chosen = [t - N_SPECIAL for t in tokens[i, 1:] if t]
        cutoff = sorted(vals.values(), reverse=True)[len(chosen) - 1]
        assert all(vals[g] >= cutoff for g in chosen) and len(chosen) == min(32, len(vals))


def test_ties_at_the_cut_are_broken_by_a_seeded_hash_not_by_vocabulary_order():
    # 200 cells, each with 20 genes all equal: the 5 kept must not always be the first 5 of the vocabulary
    X = sp.csr_matrix(np.ones((200, 20), dtype=np.float32))
    tok = Tokenizer(n_genes=20, max_genes=5, n_bins=5)
    tokens, _ = tok.encode(X, np.arange(20), tie_seed=3)
    kept = np.bincount((tokens[:, 1:] - N_SPECIAL).ravel(), minlength=20)
    assert kept.min() > 0.5 * kept.mean() and kept.max() < 1.5 * kept.mean()  # about uniform
    assert np.array_equal(tokens, tok.encode(X, np.arange(20), tie_seed=3)[0])  # deterministic
    assert not np.array_equal(tokens, tok.encode(X, np.arange(20), tie_seed=4)[0])  # seeded


def test_median_ranking_lets_cell_specific_genes_past_housekeeping_ones():
    # gene 0 is high everywhere (median 100), gene 1 is modest but 10x its own median (1 -> 10)
    X = sp.csr_matrix(np.array([[100.0, 10.0, 50.0]], dtype=np.float32))
    tok = Tokenizer(n_genes=3, max_genes=1, n_bins=5)
    assert tok.encode(X, np.arange(3))[0][0, 1] - N_SPECIAL == 0  # by count: the housekeeping gene
    scale = np.array([100.0, 1.0, 50.0])
    tokens, bins = tok.encode(X, np.arange(3), gene_scale=scale)
    assert tokens[0, 1] - N_SPECIAL == 1
    assert bins[0, 1] == 1  # bins stay the cell's own quantiles of the values: 10 is its lowest


def test_rank_order_is_the_three_key_lexsort_with_ties_everywhere():
    rng = np.random.default_rng(5)
    rows = np.sort(rng.integers(0, 40, 3000))
    score = rng.integers(0, 6, 3000).astype(np.float64) / rng.choice([1.0, 3.0], 3000)  # many equal scores
    keys = rng.integers(0, 50, 3000).astype(np.uint64)  # equal keys too: position decides
    assert np.array_equal(rank_order(rows, score, keys), np.lexsort((keys, score, rows)))
    shuffled = rng.permutation(3000)  # rows need not come sorted
    assert np.array_equal(rank_order(rows[shuffled], score[shuffled], keys[shuffled]),
                          np.lexsort((keys[shuffled], score[shuffled], rows[shuffled])))
    assert rank_order(rows[:0], score[:0], keys[:0]).size == 0


def test_rank_order_falls_back_to_lexsort_when_the_composite_would_overflow():
    rows = np.array([2**61, 0, 2**61, 5], dtype=np.int64)  # (max row + 1) × 4 levels × 4 ≥ 2**63
    score = np.array([1.0, 2.0, 1.0 + 1e-9, 0.5])
    keys = np.array([3, 1, 2, 9], dtype=np.uint64)
    assert np.array_equal(rank_order(rows, score, keys), np.lexsort((keys, score, rows)))


def test_encoding_in_chunks_of_cells_is_encoding_the_block_whole(monkeypatch):
    from atlasflow.model import tokenizer as module

    X = sp.random(700, 300, density=0.2, random_state=3, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 5)  # many ties, so the per-cell hash decides at the cut
    tok = Tokenizer(n_genes=300, max_genes=32, n_bins=11)
    scale = np.random.default_rng(1).random(300) + 0.1
    chunked = [tok.encode(X, np.arange(300), tie_seed=9), tok.encode(X, np.arange(300), gene_scale=scale)]
    monkeypatch.setattr(module, "_CHUNK_CELLS", 10**9)
    whole = [tok.encode(X, np.arange(300), tie_seed=9), tok.encode(X, np.arange(300), gene_scale=scale)]
    for (t1, b1), (t2, b2) in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(b1, b2)

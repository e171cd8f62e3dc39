"""BatchData over files whose gene axes differ (QC keeps different genes per dataset)."""

from __future__ import annotations

import multiprocessing

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasflow.model.data import BatchData, CellBatch, log_normalise, rebatch
from atlasflow.model.loader import _BufferRing, _Unpacker, shard_blocks
from atlasflow.model.tokenizer import Tokenizer
from atlasflow.prep.genes import Vocabulary


@pytest.fixture
def two_panels(tmp_path):
    """Two files measuring different genes (one column outside the vocabulary); the expected vocab-space counts."""
    vocab = Vocabulary.load("builtin:pbmc68k")
    genes = list(vocab.symbols)
    rng = np.random.default_rng(0)
    expected, totals = {}, {}
    for name, cols in (("a", genes[:40]), ("b", genes[10:30][::-1] + ["NOT_A_GENE"])):
        x = sp.random(5, len(cols), density=0.5, format="csr", random_state=rng, dtype=np.float32)
        x.data = np.ceil(x.data * 9)
        labels = ["t", "u", "nan", "t", ""] if name == "a" else ["t"] * 5
        obs = pd.DataFrame({"cell_type": labels}, index=[f"{name}{i}" for i in range(5)])
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=cols)).write_h5ad(tmp_path / f"{name}.h5ad")
        dense = np.zeros((5, len(genes)), dtype=np.float32)
        for j, g in enumerate(cols):
            if g in genes:
                dense[:, genes.index(g)] = x[:, j].toarray().ravel()
        expected[name] = dense
        totals[name] = np.asarray(x.sum(axis=1)).ravel()  # the library size counts every column
    data = BatchData(tmp_path, vocab, Tokenizer(len(vocab), 16, 11), seed=0, block_cells=2, val_fraction=0.9)
    data.val = data.train + data.val  # both files, whatever the split chose
    return data, expected, totals, genes


def test_held_out_sample_is_aligned_to_the_vocabulary(two_panels):
    data, expected, totals, genes = two_panels
    sample = data.sample("val", 100, seed=0)
    assert sample.total_cells == 10 and len(sample.cells) == 10
    order = [f.dataset_id for f in data.val]
    want = np.vstack([expected[d] for d in order])
    want_totals = np.concatenate([totals[d] for d in order])
    got = sample.cells.expr.toarray()
    np.testing.assert_allclose(got, log_normalise(sp.csr_matrix(want), want_totals).toarray(), rtol=1e-6)
    # each cell knows which genes its dataset measured: a gene b never had is missing, not zero
    mask = sample.cells.measured_mask()
    for k, d in enumerate(np.repeat(order, 5)):
        assert mask[k].sum() == (40 if d == "a" else 20)
    # unlabelled cells ("nan", empty) are marked as such, never a class called "nan"
    assert set(sample.cell_type) == {"t", "u", ""} and (sample.cell_type == "").sum() == 2


def test_sample_is_seeded_and_capped(two_panels):
    data, *_ = two_panels
    a, b = data.sample("val", 4, seed=1), data.sample("val", 4, seed=1)
    assert len(a.cells) == 4 and a.total_cells == 10
    np.testing.assert_array_equal(a.cells.tokens, b.cells.tokens)
    assert not np.array_equal(a.cells.expr.toarray(), data.sample("val", 4, seed=2).cells.expr.toarray())


def test_cell_batches_round_trip_and_merge_panels(two_panels):
    data, *_ = two_panels
    cells = data.sample("val", 10, seed=0).cells
    back = CellBatch.from_arrays(np.load(_save(cells, data.batch_dir / "x.npz")), "")
    np.testing.assert_array_equal(back.tokens, cells.tokens)
    np.testing.assert_array_equal(back.measured_mask(), cells.measured_mask())
    np.testing.assert_allclose(back.expr.toarray(), cells.expr.toarray())
    merged = CellBatch.concat([cells.take(slice(0, 3)), cells.take(slice(3, None)), back])
    assert len(merged) == 20 and merged.measured.shape[0] == 2  # identical panels stored once
    np.testing.assert_array_equal(merged.measured_mask()[10:], cells.measured_mask())


def test_streamed_batches_cover_every_training_cell_once(two_panels):
    data, *_ = two_panels
    data.train, data.val = data.val, []
    steps = list(data.batches(epoch=0, batch_cells=3))
    assert [len(c) for _, c in steps] == [3, 3, 3, 1]
    resumed = list(data.batches(epoch=0, batch_cells=3, start_step=2))
    np.testing.assert_array_equal(resumed[0][1].tokens, steps[2][1].tokens)


def _same_cells(a: CellBatch, b: CellBatch) -> None:
    for name in ("tokens", "bins", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.expr.toarray(), b.expr.toarray())
    np.testing.assert_array_equal(a.measured_mask(), b.measured_mask())


def test_steps_are_the_same_cells_whatever_the_blocks_and_the_hand_over(two_panels):
    """Blocks of 2 cut into steps of 3 (every step but none straddles) and read by 2 DataLoader
    workers (blocks handed over in shared memory): the steps of one in-process concatenation."""
    data, *_ = two_panels
    data.train, data.val = data.val, []
    whole = CellBatch.concat(list(data.stream(epoch=0)))
    for workers in (0, 2):
        blocks = shard_blocks(data, epoch=0, start_cell=0, shard=0, shards=1, workers=workers)
        steps = list(rebatch(blocks, batch_cells=3))
        assert [s for s, _ in steps] == [0, 1, 2, 3] and [len(c) for _, c in steps] == [3, 3, 3, 1]
        for step, cells in steps:
            _same_cells(cells, whole.take(slice(3 * step, 3 * step + 3)))
        # consumed one step at a time, as training does: the workers' buffers are reused
        copied = [(s, cells.tokens.copy(), cells.expr.toarray()) for s, cells in
                  rebatch(shard_blocks(data, epoch=0, start_cell=0, shard=0, shards=1, workers=workers), batch_cells=3)]
        for (step, tokens, expr), (want_step, want) in zip(copied, steps, strict=True):
            assert step == want_step
            np.testing.assert_array_equal(tokens, want.tokens)
            np.testing.assert_array_equal(expr, want.expr.toarray())
    steps = list(rebatch(data.stream(epoch=0), batch_cells=2, start_step=5))  # steps inside one block each
    assert [s for s, _ in steps] == [5, 6, 7, 8, 9]
    _same_cells(steps[1][1], whole.take(slice(2, 4)))


def _save(cells: CellBatch, path):
    np.savez(path, **cells.to_arrays(""))
    return path


def test_worker_buffers_are_reused_only_once_nothing_reads_them(two_panels):
    """The hand-over's two ends in one process: a buffer travels to the training process once and is
    reused once its block's last array is gone; blocks the consumer still holds are never
    overwritten (the worker writes into one-off buffers instead); a larger block gets a larger buffer."""
    data, *_ = two_panels
    data.train, data.val = data.val, []
    blocks = list(data.stream(epoch=0))
    recv, send = multiprocessing.Pipe(duplex=False)
    ring, unpacker = _BufferRing(0, recv, size=2), _Unpacker([send])
    travelled = []
    for block in [blocks[0]] * 6:  # read and dropped, block after block
        item = ring.pack(block)
        travelled.append(item.buffer is not None)
        _same_cells(unpacker.cells(item), block)
    assert travelled == [True, True, False, False, False, False]

    bigger = CellBatch.concat(blocks[:3])
    item = ring.pack(bigger)
    assert item.slot is not None and item.buffer is not None  # a free buffer, too small: replaced
    _same_cells(unpacker.cells(item), bigger)

    recv, send = multiprocessing.Pipe(duplex=False)
    ring, unpacker = _BufferRing(0, recv, size=2), _Unpacker([send])
    held = []
    for block in blocks:
        item = ring.pack(block)
        held.append((item.slot, unpacker.cells(item), block))
    assert [slot for slot, *_ in held] == [0, 1] + [None] * (len(blocks) - 2)
    for _, got, want in held:
        _same_cells(got, want)

"""Simulated single-cell reads with a known answer (tests, benchmarks, demo).

:func:`make_reference` writes a small synthetic genome (random sequence, one chromosome) with
single- and two-exon genes and its GTF, which ``kb ref`` turns into a kallisto index.
:func:`simulate_10x` writes 10x Chromium reads for it: R1 = cell barcode + UMI (+ poly-T), R2 =
cDNA from near the transcript's 3' end, with a known number of distinct UMIs per gene per
barcode (the truth matrix). Each UMI gets one to three reads (PCR duplicates), which a correct
UMI collapse counts once. Reads carry no sequencing errors and genes share no k-mers (random
sequence), so the truth is exactly recoverable: a test may demand equality.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHEMISTRY_LAYOUT", "ENA_HOST", "Reference", "SimulatedRun", "build_fastq_demo", "indexed_reference",
           "make_reference", "publish_ena", "simulate_10x", "write_fastq"]

log = logging.getLogger(__name__)
_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
_COMPLEMENT = bytes.maketrans(b"ACGTN", b"TGCAN")
# barcode length, UMI length, R1 length as sequenced (10x v3 sequences 28 bp; v2 26 bp)
CHEMISTRY_LAYOUT: dict[str, tuple[int, int, int]] = {"10xv2": (16, 10, 26), "10xv3": (16, 12, 28)}


@dataclass(frozen=True)
class Reference:
    genome: Path
    gtf: Path
    gene_ids: tuple[str, ...]
    gene_names: tuple[str, ...]
    transcripts: dict[str, str]  # gene id -> spliced transcript sequence (sense)


@dataclass(frozen=True)
class SimulatedRun:
    r1: Path
    r2: Path
    barcodes: tuple[str, ...]
    truth: np.ndarray  # barcodes x genes, distinct UMIs
    n_reads: int


def _random_seq(rng: np.random.Generator, n: int) -> str:
    return _BASES[rng.integers(0, 4, n)].tobytes().decode()


def make_reference(folder: Path, *, n_genes: int = 12, seed: int = 0, gene_prefix: str = "SIMG",
                   gene_names: list[str] | None = None) -> Reference:
    """Write ``genome.fa`` and ``genes.gtf`` under ``folder``: ``n_genes`` genes on chr1, every
    third one on the minus strand and every other one with two exons (so ``kb ref`` must splice).
    ``gene_names`` (e.g. symbols of the vocabulary) replaces the ``SIMG1…`` names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pieces: list[str] = []
    gtf: list[str] = []
    transcripts: dict[str, str] = {}
    ids, names = [], []
    pos = 0

    def add(seq: str) -> tuple[int, int]:
        nonlocal pos
        pieces.append(seq)
        start = pos + 1
        pos += len(seq)
        return start, pos

    add(_random_seq(rng, 300))
    for g in range(n_genes):
        gid, tid = f"ENSSIM{g:05d}", f"ENSSIMT{g:05d}"
        name = gene_names[g] if gene_names else f"{gene_prefix}{g + 1}"
        strand = "-" if g % 3 == 2 else "+"
        exon_lens = [int(rng.integers(400, 700))] + ([int(rng.integers(300, 500))] if g % 2 else [])
        exons: list[tuple[int, int, str]] = []
        for i, length in enumerate(exon_lens):
            if i:
                add(_random_seq(rng, 200))  # intron
            seq = _random_seq(rng, length)
            s, e = add(seq)
            exons.append((s, e, seq))
        spliced = "".join(x[2] for x in exons)
        if strand == "-":
            spliced = spliced.encode().translate(_COMPLEMENT)[::-1].decode()
        transcripts[gid] = spliced
        ids.append(gid)
        names.append(name)
        attrs = f'gene_id "{gid}"; gene_name "{name}"; gene_biotype "protein_coding";'
        tattrs = attrs + f' transcript_id "{tid}"; transcript_name "{name}-201"; transcript_biotype "protein_coding";'
        gs, ge = exons[0][0], exons[-1][1]
        gtf.append(f"chr1\tsim\tgene\t{gs}\t{ge}\t.\t{strand}\t.\t{attrs}")
        gtf.append(f"chr1\tsim\ttranscript\t{gs}\t{ge}\t.\t{strand}\t.\t{tattrs}")
        for n, (s, e, _) in enumerate(exons, start=1):
            gtf.append(f'chr1\tsim\texon\t{s}\t{e}\t.\t{strand}\t.\t{tattrs} exon_number "{n}";')
        add(_random_seq(rng, 300))
    genome = "".join(pieces)
    fa = folder / "genome.fa"
    with fa.open("w") as fh:
        fh.write(">chr1\n")
        for i in range(0, len(genome), 60):
            fh.write(genome[i:i + 60] + "\n")
    (folder / "genes.gtf").write_text("\n".join(gtf) + "\n")
    return Reference(fa, folder / "genes.gtf", tuple(ids), tuple(names), transcripts)


def write_fastq(path: Path, records: list[tuple[str, str]], *, compress: bool = True) -> Path:
    """Write ``(name, sequence)`` records with constant quality ``I``."""
    opener = gzip.open if compress else open
    with opener(path, "wt") as fh:  # type: ignore[operator]
        for name, seq in records:
            fh.write(f"@{name}\n{seq}\n+\n{'I' * len(seq)}\n")
    return path


def simulate_10x(
    reference: Reference,
    out_dir: Path,
    *,
    chemistry: str = "10xv3",
    n_cells: int = 10,
    mean_umis: float = 2.5,
    read_length: int = 90,
    seed: int = 1,
    whitelist: list[str] | None = None,
    prefix: str = "sample",
    r1_length: int | None = None,
) -> SimulatedRun:
    """Simulate one 10x run of ``n_cells`` cells into ``out_dir/<prefix>_R1.fastq.gz`` / ``_R2``.

    ``truth[c, g]`` distinct UMIs are drawn per cell and gene (Poisson, ``mean_umis``); every
    cell gets at least one UMI. Barcodes come from ``whitelist`` (the chemistry's on-list, so
    ``kb count`` keeps them) when given, else random. ``r1_length`` overrides the chemistry's
    R1 length (to simulate reads that do not fit it).
    """
    bc_len, umi_len, r1_len = CHEMISTRY_LAYOUT[chemistry]
    r1_len = r1_length if r1_length is not None else r1_len
    rng = np.random.default_rng(seed)
    genes = list(reference.gene_ids)
    if whitelist is not None:
        picks = rng.choice(len(whitelist), size=n_cells, replace=False)
        barcodes = [whitelist[int(i)] for i in picks]
    else:
        barcodes = sorted({_random_seq(rng, bc_len) for _ in range(n_cells * 2)})[:n_cells]
    truth = rng.poisson(mean_umis, size=(n_cells, len(genes)))
    for c in range(n_cells):
        if truth[c].sum() == 0:
            truth[c, int(rng.integers(len(genes)))] = 1
    r1: list[tuple[str, str]] = []
    r2: list[tuple[str, str]] = []
    n = 0
    for c, bc in enumerate(barcodes):
        umis: set[str] = set()
        for g, gid in enumerate(genes):
            tx = reference.transcripts[gid]
            for _ in range(int(truth[c, g])):
                umi = _random_seq(rng, umi_len)
                while umi in umis:  # distinct within the cell: a collision would merge two molecules
                    umi = _random_seq(rng, umi_len)
                umis.add(umi)
                for _dup in range(int(rng.integers(1, 4))):
                    # 3' biased fragments, as in 10x 3' libraries; R2 reads the sense strand
                    end = len(tx) - int(rng.integers(0, min(200, len(tx) - read_length)))
                    seq2 = tx[end - read_length:end]
                    seq1 = (bc + umi + "T" * 64)[:r1_len]
                    name = f"r{n}"
                    r1.append((name, seq1))
                    r2.append((name, seq2))
                    n += 1
    order = rng.permutation(n)  # reads in sequencer order, not grouped by cell
    r1 = [r1[i] for i in order]
    r2 = [r2[i] for i in order]
    out_dir.mkdir(parents=True, exist_ok=True)
    p1 = write_fastq(out_dir / f"{prefix}_R1.fastq.gz", r1)
    p2 = write_fastq(out_dir / f"{prefix}_R2.fastq.gz", r2)
    log.info("simulated %d reads, %d UMIs in %d cells x %d genes", n, int(truth.sum()), n_cells, len(genes))
    return SimulatedRun(p1, p2, tuple(barcodes), truth, n)


ENA_HOST = "ftp.sra.ebi.ac.uk"


def publish_ena(root: Path, accession: str, files: list[Path], *, api_path: str = "ena/portal/api") -> str:
    """Serve ``files`` as ENA would, below a local server's ``root``: the FASTQ under
    ``vol1/fastq/<acc>/`` and a ``filereport`` answer (TSV with links, sizes, MD5s) for the run.

    Returns the API base URL path (``/ena/portal/api``) to put after the server's address. The
    links name ENA's own host, as the real API does: ``download.ena_fastq_base_url`` redirects them.
    """
    import hashlib
    import shutil

    folder = root / "vol1" / "fastq" / accession
    folder.mkdir(parents=True, exist_ok=True)
    links, sizes, md5s = [], [], []
    for i, f in enumerate(files, start=1):
        name = f"{accession}_{i}.fastq.gz"
        shutil.copyfile(f, folder / name)
        links.append(f"{ENA_HOST}/vol1/fastq/{accession}/{name}")
        sizes.append(str(f.stat().st_size))
        md5s.append(hashlib.md5(f.read_bytes()).hexdigest())
    report = root / api_path / "filereport"
    report.mkdir(parents=True, exist_ok=True)
    (report / f"{accession}.tsv").write_text("run_accession\tfastq_ftp\tfastq_bytes\tfastq_md5\n"
                                             f"{accession}\t{';'.join(links)}\t{';'.join(sizes)}\t{';'.join(md5s)}\n")
    return "/" + api_path


def indexed_reference(folder: Path, *, n_genes: int = 12, n_barcodes: int = 500, seed: int = 7,
                      gene_names: list[str] | None = None) -> dict[str, Any]:
    """A synthetic reference indexed with the real ``kb ref``, and a small 10x on-list, under ``folder``.

    The on-list (``n_barcodes`` random 16-mers; simulated cells are drawn from it) keeps barcode
    correction fast: kb's own 10x v3 list is 6.8 M barcodes and takes ~10 s per sample to load.
    Returns ``{"ref", "index", "t2g", "onlist", "barcodes"}``.
    """
    from atlasflow.acquire.quant import build_reference

    ref = make_reference(folder, n_genes=n_genes, gene_names=gene_names)
    paths = build_reference(ref.genome, ref.gtf, folder / "index")
    rng = np.random.default_rng(seed)
    barcodes = sorted({"".join("ACGT"[i] for i in rng.integers(0, 4, 16)) for _ in range(n_barcodes)})
    onlist = folder / "onlist.txt"
    onlist.write_text("\n".join(barcodes) + "\n")
    return {"ref": ref, "index": paths["index"], "t2g": paths["t2g"], "onlist": str(onlist), "barcodes": barcodes}


def build_fastq_demo(root: Path, url: str, *, reference: Reference, index: str, t2g: str, onlist: str,
                     barcodes: list[str], n_samples: int = 3, n_cells: int = 10, mean_umis: float = 2.5,
                     batch_size: int | None = None, extra_rows: list[list[str]] | None = None,
                     seed: int = 0) -> dict[str, object]:
    """A reads-only ingest set-up under ``root``: ``n_samples`` simulated 10x v3 runs published as
    ENA runs ``SRR9000000…`` below ``root/www`` (serve it at ``url``), ``root/manifest.csv`` (sra
    rows with ``technology: 10xv3`` and ``expected_bytes`` = the FASTQ sizes, plus ``extra_rows``)
    and ``root/atlasflow.yaml`` pointing the ENA resolver and kb count at them.

    Returns ``{"truth": {dataset_id: (barcodes, matrix)}, "fastq_bytes": {dataset_id: bytes}}``.
    """
    import csv

    www = root / "www"
    truth: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    sizes: dict[str, int] = {}
    rows = []
    for i in range(n_samples):
        acc, ds = f"SRR{9_000_000 + i}", f"fq{i}"
        run = simulate_10x(reference, root / "sim" / acc, n_cells=n_cells, mean_umis=mean_umis, whitelist=barcodes,
                           seed=seed + i)
        publish_ena(www, acc, [run.r1, run.r2])
        truth[ds] = (run.barcodes, run.truth)
        sizes[ds] = run.r1.stat().st_size + run.r2.stat().st_size
        rows.append([ds, acc, "sra", "", str(sizes[ds]), "10xv3"])
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dataset_id", "download_url", "type", "format", "expected_bytes", "technology"])
        writer.writerows(rows + list(extra_rows or []))
    (root / "atlasflow.yaml").write_text(f"""# simulated FASTQ runs behind a local ENA stand-in
storage:
  base_dir: base
  max_storage_gb: 1
  data_gb: 0.5
  models_gb: 0.4
  cache_gb: 0.05
  outputs_gb: 0.05
  min_free_gb: 0
  checkpoint_gb: 0.001
  unknown_size_gb: 0.001
manifest:
  path: manifest.csv
  allowed_file_root: www
plan:
  batch_size: {batch_size or n_samples + len(extra_rows or [])}
  schedule: null
download:
  sra_resolver: ena
  ena_base_url: {url}/ena/portal/api
  ena_fastq_base_url: {url}
  retries: 1
  backoff_s: 0.1
quant:
  index: {index}
  t2g: {t2g}
  onlist: {onlist}
  threads: 1
  index_gb: 0.001
  work_fixed_gb: 0.001
genes:
  vocab_path: builtin:pbmc68k  # small, like the simulated genes (named after its symbols by the tests)
qc:
  min_genes: 1
  min_cells: 1
  max_pct_mito: 100
  min_vocab_coverage: 0
integration:
  enabled: false
""")
    return {"truth": truth, "fastq_bytes": sizes}

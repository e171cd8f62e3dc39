"""Raw reads → a count matrix with kallisto|bustools (``kb count`` from kb-python).

:func:`quantify` checks a sample's FASTQ files before anything runs (gzip stream intact to the
end, four-line records, R1/R2 with the same number of reads, read lengths that fit the
chemistry), runs ``kb count`` against the configured index with a hard time limit (the whole
process group is killed when it is exceeded), and writes the unfiltered gene matrix as a 10x
Matrix Market folder, ``<raw>/counts/``, which :mod:`atlasflow.readers.formats` reads like any other
10x download. ``counts/quant.json`` is written last: it marks the sample as quantified.

kallisto itself accepts a truncated ``.fastq.gz`` and quantifies the reads before the cut
without a word, and reads too short for the barcode+UMI give an empty matrix; that is why the
checks come first. Every problem raises :class:`QuantError`, whose message names the file and
what to do; the pipeline quarantines the dataset with it.

``build_reference`` wraps ``kb ref`` (genome FASTA + GTF → index, t2g, cDNA FASTA): a one-off
command, ``atlasflow quant ref``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasflow.core.config import QuantConfig
from atlasflow.core.fsutil import GzipDamaged, gunzip_blocks, owner_alive, write_json_atomic

__all__ = [
    "CHEMISTRIES",
    "Chemistry",
    "FastqStats",
    "QuantError",
    "build_reference",
    "check_fastq",
    "fastq_files",
    "kb_executable",
    "order_reads",
    "quantified",
    "quantify",
    "reference_problems",
]

log = logging.getLogger(__name__)
FASTQ_SUFFIXES = (".fastq.gz", ".fq.gz", ".fastq", ".fq")
COUNTS_DIR = "counts"
MARKER = "quant.json"
_SAMPLE_LENGTHS = 1000  # reads per file whose lengths are checked against the chemistry
# sample_R1.fastq.gz, SRR1_1.fastq.gz, x_S1_L001_R2_001.fastq.gz, y_I1_001.fastq.gz
_READ_NAME = re.compile(r"^(?P<stem>.+?)[._](?P<read>R?[123]|I[12])(?:_001)?\.f(?:ast)?q(?:\.gz)?$", re.IGNORECASE)


class QuantError(ValueError):
    """The sample cannot be quantified; the message names the file or setting and the fix."""


@dataclass(frozen=True)
class Chemistry:
    """What ``kb count -x`` calls it, and the barcode + UMI read's layout (None: no barcode read)."""

    kb_name: str
    barcode_umi_bp: int | None
    paired: bool = True


CHEMISTRIES: dict[str, Chemistry] = {
    "10xv2": Chemistry("10XV2", 16 + 10),
    "10xv3": Chemistry("10XV3", 16 + 12),
    "smartseq2": Chemistry("SMARTSEQ2", None),
}


@dataclass(frozen=True)
class FastqStats:
    path: str
    reads: int
    min_length: int
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reads": self.reads, "min_length": self.min_length, "max_length": self.max_length}


def fastq_files(folder: Path) -> list[Path]:
    """The FASTQ files directly in ``folder`` (partial downloads left out)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(FASTQ_SUFFIXES))


def quantified(raw_dir: Path) -> dict[str, Any] | None:
    """The summary of an earlier successful quantification of this folder, or None."""
    marker = raw_dir / COUNTS_DIR / MARKER
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except ValueError:
        return None


def _chunks(path: Path, size: int = 1 << 20) -> Any:
    """Decompressed bytes of a FASTQ(.gz), raising QuantError on a damaged or cut gzip stream.

    Handles multi-member gzip (bgzip and concatenated files, common for FASTQ): a stream is whole
    when its last member reached its end-of-stream marker.
    """
    with path.open("rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            if path.name.endswith(".gz"):
                raise QuantError(f"{path.name}: not gzip data although the name ends in .gz")
            fh.seek(0)
            while block := fh.read(size):
                yield block
            return
        fh.seek(0)
        try:
            yield from gunzip_blocks(fh, size=size)
        except GzipDamaged as exc:
            if exc.truncated:
                raise QuantError(f"{path.name}: the gzip stream is truncated (the file ends before its "
                                 "end-of-stream marker: an interrupted download or copy); download it again") from exc
            raise QuantError(f"{path.name}: {exc}; download it again") from exc


# the longest line check_fastq holds: kb count takes short reads (hundreds of bases), never this
MAX_FASTQ_LINE = 4 * 2**20


def check_fastq(path: Path) -> FastqStats:
    """Read the whole file once: gzip intact, four-line records, read lengths of the first reads.

    Raises
    ------
    QuantError
        Truncated or damaged gzip, a record cut short, a header not starting with ``@``, an empty file.
    """
    lines = 0
    lengths: list[int] = []
    pending = b""
    first = True
    for block in _chunks(path):
        data = pending + block
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) > MAX_FASTQ_LINE:  # memory stays bounded whatever one line claims to hold
                raise QuantError(f"{path.name}: a line longer than {MAX_FASTQ_LINE} bytes (not FASTQ, or a "
                                 "decompression bomb)")
            pending = data
            continue
        complete, pending = data[: cut + 1], data[cut + 1:]
        if first:
            if not complete.startswith(b"@"):
                raise QuantError(f"{path.name}: not FASTQ (the first line does not start with '@')")
            first = False
        if len(lengths) < _SAMPLE_LENGTHS:
            rows = complete.split(b"\n")
            for i, row in enumerate(rows[:-1], start=lines):
                if i % 4 == 0 and not row.startswith(b"@"):
                    raise QuantError(f"{path.name}: record {i // 4 + 1} does not start with '@' (not FASTQ, or "
                                     "lines out of step)")
                if i % 4 == 1 and len(lengths) < _SAMPLE_LENGTHS:
                    lengths.append(len(row.rstrip(b"\r")))
        lines += complete.count(b"\n")
    if pending.strip():
        lines += 1  # a last line without its newline
    if lines == 0:
        raise QuantError(f"{path.name}: the FASTQ file is empty")
    if lines % 4:
        raise QuantError(f"{path.name}: {lines} lines, not a whole number of 4-line FASTQ records (the file is cut "
                         "short); download it again")
    return FastqStats(str(path), lines // 4, min(lengths), max(lengths))


def order_reads(files: Sequence[Path], technology: str, lengths: dict[Path, int] | None = None) -> list[Path]:
    """The FASTQ files in the order ``kb count`` wants: R1, R2 per run (index reads dropped).

    ``lengths`` (longest read per file) settles runs dumped with three reads
    (``fasterq-dump --include-technical`` of a 10x run: index, barcode+UMI and cDNA reads, in the
    order they were submitted): the shortest is the index read, the longest the cDNA.

    Raises
    ------
    QuantError
        When the files cannot be paired for a paired chemistry.
    """
    chem = CHEMISTRIES[technology]
    groups: dict[str, dict[str, Path]] = {}
    singles: list[Path] = []
    for f in files:
        m = _READ_NAME.match(f.name)
        if not m:
            singles.append(f)
            continue
        read = m.group("read").upper().lstrip("R")
        if read.startswith("I"):
            continue  # sample index reads are not quantified
        groups.setdefault(m.group("stem"), {})[read] = f
    if chem.barcode_umi_bp is None:  # Smart-seq2: paired or single-end, one cell per run
        out = []
        for stem in sorted(groups):
            out += [groups[stem][k] for k in sorted(groups[stem])]
        return out + sorted(singles)
    ordered: list[Path] = []
    for stem in sorted(groups):
        reads = groups[stem]
        if {"1", "2", "3"} <= set(reads) and lengths:
            by_length = sorted((reads[k] for k in ("1", "2", "3")), key=lambda p: lengths[p])
            ordered += by_length[1:]  # barcode+UMI read, then cDNA; the index read is not quantified
        elif "1" in reads and "2" in reads:
            ordered += [reads["1"], reads["2"]]
        else:
            raise QuantError(f"{technology} needs read 1 (barcode+UMI) and read 2 (cDNA) of each run; for {stem!r} "
                             f"found only {', '.join(p.name for p in reads.values())}")
    if singles:
        raise QuantError(f"{technology} needs paired files named like *_R1/_R2 or *_1/_2; cannot tell which read "
                         f"{', '.join(p.name for p in singles)} is")
    if not ordered:
        raise QuantError("no FASTQ files to quantify")
    return ordered


def _check_lengths(stats: Sequence[FastqStats], technology: str) -> None:
    chem = CHEMISTRIES[technology]
    if chem.barcode_umi_bp is None:
        return
    for r1, r2 in zip(stats[0::2], stats[1::2], strict=True):
        name1, name2 = Path(r1.path).name, Path(r2.path).name
        if r1.reads != r2.reads:
            raise QuantError(f"{name1} has {r1.reads} reads but {name2} has {r2.reads}: the pair is out of step "
                             "(a truncated or mismatched file)")
        if r1.min_length < chem.barcode_umi_bp:
            raise QuantError(
                f"{name1}: reads of {r1.min_length} bp, shorter than the {chem.barcode_umi_bp} bp barcode+UMI of "
                f"{technology}; is the technology right (10xv2 needs 26 bp, 10xv3 28 bp) or are R1/R2 swapped?")
        if r2.max_length < 31:
            raise QuantError(f"{name2}: cDNA reads of at most {r2.max_length} bp, shorter than kallisto's k-mer "
                             "(31): nothing can pseudoalign; are R1/R2 swapped?")
        if r1.max_length > 2 * chem.barcode_umi_bp + 20 and r2.max_length <= chem.barcode_umi_bp + 10:
            raise QuantError(f"{name1} holds the long reads and {name2} the short ones: R1 and R2 look swapped")


def kb_executable() -> str:
    """``kb`` from this interpreter's environment (the venv), else the PATH."""
    here = Path(sys.executable).parent / "kb"
    found = str(here) if here.exists() else shutil.which("kb")
    if found is None:
        raise QuantError("kb-python is not installed (`pip install kb-python`); it provides kallisto and bustools")
    return found


def reference_problems(config: QuantConfig) -> list[str]:
    """What keeps ``quant.index`` / ``quant.t2g`` / ``quant.onlist`` from being used; empty when ready."""
    problems = []
    for key in ("index", "t2g"):
        value = getattr(config, key)
        if not value:
            problems.append(f"quant.{key} is not configured; build a reference once with `atlasflow quant ref "
                            "--fasta GENOME.fa --gtf GENES.gtf --out DIR` and set quant.index / quant.t2g")
        elif not Path(value).is_file():
            problems.append(f"quant.{key} {value} does not exist; build it with `atlasflow quant ref --fasta "
                            "GENOME.fa --gtf GENES.gtf --out DIR` (or fix the path)")
    for key in ("onlist", "onlist_10xv2", "onlist_10xv3"):
        if (value := getattr(config, key)) and not Path(value).is_file():
            problems.append(f"quant.{key} {value} does not exist")
    return problems


LOCK_NAME = "kb.lock.json"  # in a quantification's work folder: who runs there (see reap_stale_run)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Any:
    """A ``preexec_fn``: the child gets SIGKILL when the process that started it dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed task takes its ``kb count`` with it. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        os.setsid()  # its own process group, so a timeout can stop kb and everything it started
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def _run(argv: list[str], *, timeout_s: float, log_path: Path, cwd: Path | None = None,
         lock: Path | None = None) -> None:
    """Run ``argv`` in its own process group; on timeout, TERM then KILL the whole group.

    The child dies with this process (parent-death signal); ``lock`` records its process group,
    this process and host, so a retry after a kill can stop what is left (:func:`reap_stale_run`):
    kb count's own children do not inherit the parent-death signal.
    """
    log.info("running %s", argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec = _die_with_parent()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=preexec,  # noqa: PLW1509
                                start_new_session=preexec is None)
        if lock is not None:
            write_json_atomic(lock, {"pgid": proc.pid, "parent_pid": os.getpid(), "host": socket.gethostname(),
                                     "program": Path(argv[0]).name, "started": time.time()})
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise QuantError(f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} did not finish within "
                             f"{timeout_s:g} s (quant.timeout_s); its processes were stopped. Log: {log_path}") from None
        except BaseException:
            _kill_group(proc)  # the task itself was killed: leave no kallisto behind
            raise
    if lock is not None:
        lock.unlink(missing_ok=True)
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip()[-1500:]
        raise QuantError(f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} exited {rc}: {tail}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (from /proc; empty where there is none)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _runs_in(pid: int, work_dir: Path) -> bool:
    """Whether process ``pid`` works in ``work_dir`` (its command line names it): a recycled PID does not."""
    try:
        return str(work_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def reap_stale_run(work_dir: Path, *, wait_s: float = 10.0) -> int | None:
    """Stop what a killed earlier try left running in ``work_dir``; returns the process group stopped.

    The try's lock (``kb.lock.json``) names its process group. It is stopped (TERM, then KILL) only
    when its task is gone and a process of that group still names ``work_dir`` on its command line
    (never a process picked by name, never a recycled PID). A lock of another host is left alone.

    Raises
    ------
    QuantError
        The task that wrote the lock is alive and its kb count still runs: two tries at once.
    """
    lock = work_dir / LOCK_NAME
    try:
        info = json.loads(lock.read_text())
        pgid, parent, host = int(info["pgid"]), int(info["parent_pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        log.warning("%s: recorded by a try on %s; its processes cannot be checked from here", lock, host)
        return None
    ours = [pid for pid in _group_members(pgid) if _runs_in(pid, work_dir)]
    if not ours:
        return None
    if parent != os.getpid() and owner_alive(parent, host):
        raise QuantError(f"{work_dir}: another task (pid {parent}) is still quantifying here (process group {pgid})")
    log.warning("%s: stopping process group %d left running by a killed earlier try", work_dir, pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_members(pgid):
            time.sleep(0.05)
        if not _group_members(pgid):
            break
    return pgid


def _reads_bytes(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _detect(found: Sequence[Path], lengths: dict[Path, int], config: QuantConfig) -> dict[str, Any]:
    """Detect the chemistry of a row without a technology; QuantError with the figures when undecidable."""
    from atlasflow.acquire.chemistry import UndecidableChemistry, detect_chemistry

    try:
        # any 10x chemistry pairs the files the same way: read 1 of each run is the barcode + UMI read
        r1 = order_reads(found, "10xv3", lengths)[0::2]
    except QuantError as exc:
        raise QuantError(f"cannot detect the chemistry: {exc}; set the row's technology (10xv2, 10xv3, "
                         "smartseq2)") from exc
    try:
        return detect_chemistry(r1, config).to_dict()
    except UndecidableChemistry as exc:
        raise QuantError(str(exc)) from exc


def quantify(raw_dir: Path, *, technology: str | None, config: QuantConfig, work_dir: Path) -> dict[str, Any]:
    """Quantify the FASTQ files in ``raw_dir`` into ``raw_dir/counts/``; idempotent.

    Parameters
    ----------
    raw_dir
        The sample's download folder.
    technology
        One of :data:`CHEMISTRIES` (the manifest's ``technology``); empty: detected from the reads
        (:mod:`atlasflow.acquire.chemistry`), recorded as ``detection`` in the summary.
    config
        ``quant`` section: index, t2g, on-list, threads, memory, time limit.
    work_dir
        Scratch folder for kb's BUS files (under ``cache/``); removed afterwards.

    Returns
    -------
    A summary: reads processed and pseudoaligned, barcodes, genes, seconds, FASTQ bytes.

    Raises
    ------
    QuantError
        Missing index, bad FASTQ, kb failure or time-out, nothing pseudoaligned.
    """
    if (done := quantified(raw_dir)) is not None:
        log.info("%s already quantified", raw_dir)
        return done
    if technology and technology not in CHEMISTRIES:
        raise QuantError(f"unknown technology {technology!r}; expected one of: {', '.join(CHEMISTRIES)}")
    if problems := reference_problems(config):
        raise QuantError(problems[0])
    t0 = time.monotonic()
    found = fastq_files(raw_dir)
    checked = {f: check_fastq(f) for f in found}  # every file, index reads too: a cut file is never quantified
    detection = None
    if not technology:
        detection = _detect(found, {f: st.max_length for f, st in checked.items()}, config)
        technology = str(detection["chemistry"])
    files = order_reads(found, technology, {f: st.max_length for f, st in checked.items()})
    stats = [checked[f] for f in files]
    _check_lengths(stats, technology)
    chem = CHEMISTRIES[technology]
    reap_stale_run(work_dir)  # a killed earlier try's kb count must not write beside this one
    shutil.rmtree(work_dir, ignore_errors=True)  # a killed earlier try leaves half-written BUS files
    work_dir.mkdir(parents=True, exist_ok=True)
    argv = [kb_executable(), "count", "-i", str(config.index), "-g", str(config.t2g), "-x", chem.kb_name,
            "-o", str(work_dir / "out"), "--tmp", str(work_dir / "tmp"), "-t", str(config.threads),
            "-m", f"{max(1, round(config.memory_gb))}G", "--cellranger"]
    onlist = getattr(config, f"onlist_{technology}", None) or config.onlist
    if onlist and chem.barcode_umi_bp is not None:
        argv += ["-w", str(onlist)]
    if chem.barcode_umi_bp is None:
        argv += ["--parity", "paired" if len(files) % 2 == 0 and len(files) > 1 else "single"]
    argv += [str(f) for f in files]
    _run(argv, timeout_s=config.timeout_s, log_path=work_dir / "kb.log", lock=work_dir / LOCK_NAME)
    out = work_dir / "out"
    run_info = json.loads((out / "run_info.json").read_text()) if (out / "run_info.json").exists() else {}
    processed = int(run_info.get("n_processed", 0))
    aligned = int(run_info.get("n_pseudoaligned", 0))
    if processed and not aligned:
        raise QuantError(f"none of {processed} reads pseudoaligned to {config.index}: wrong species or index, or R1/R2 "
                         "swapped")
    cellranger = next((p for p in out.rglob("cellranger") if p.is_dir()), None)
    if cellranger is None or not (cellranger / "matrix.mtx.gz").exists() and not (cellranger / "matrix.mtx").exists():
        raise QuantError(f"kb count wrote no matrix under {out}; log: {work_dir / 'kb.log'}")
    counts = raw_dir / COUNTS_DIR
    shutil.rmtree(counts, ignore_errors=True)
    counts.mkdir(parents=True)
    for f in cellranger.iterdir():
        shutil.copy2(f, counts / f.name)
    n_barcodes = sum(1 for _ in _lines(counts, "barcodes.tsv"))
    n_genes = sum(1 for _ in _lines(counts, "genes.tsv"))
    summary = {
        "technology": technology, "technology_source": "detected" if detection else "manifest", "detection": detection,
        "kb_technology": chem.kb_name, "index": str(config.index),
        "fastq": [s.to_dict() for s in stats], "fastq_bytes": _reads_bytes(files),
        "reads_processed": processed, "reads_pseudoaligned": aligned,
        "percent_pseudoaligned": round(100.0 * aligned / processed, 2) if processed else 0.0,
        "barcodes": n_barcodes, "genes": n_genes, "counts_dir": str(counts),
        "counts_bytes": sum(p.stat().st_size for p in counts.iterdir()),
        "kallisto": run_info.get("kallisto_version"), "seconds": round(time.monotonic() - t0, 2),
    }
    shutil.rmtree(work_dir, ignore_errors=True)  # BUS files and kb's on-list copy: not needed any more
    write_json_atomic(counts / MARKER, summary)
    log.info("quantified %s: %d of %d reads pseudoaligned, %d barcodes x %d genes in %.1f s", raw_dir, aligned,
             processed, n_barcodes, n_genes, summary["seconds"])
    return summary


def _lines(folder: Path, stem: str) -> Any:
    import gzip

    path = folder / f"{stem}.gz" if (folder / f"{stem}.gz").exists() else folder / stem
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:  # type: ignore[operator]
        yield from (line for line in fh if line.strip())


def build_reference(fasta: Path, gtf: Path, out_dir: Path, *, timeout_s: float = 6 * 3600.0) -> dict[str, str]:
    """``kb ref``: genome FASTA + GTF → ``index.idx``, ``t2g.txt``, ``cdna.fa`` in ``out_dir``.

    Returns the paths, ready for ``quant.index`` / ``quant.t2g``.
    """
    for p in (fasta, gtf):
        if not p.is_file():
            raise QuantError(f"{p}: no such file")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"index": out_dir / "index.idx", "t2g": out_dir / "t2g.txt", "cdna": out_dir / "cdna.fa"}
    argv = [kb_executable(), "ref", "-i", str(paths["index"]), "-g", str(paths["t2g"]), "-f1", str(paths["cdna"]),
            "--tmp", str(out_dir / "tmp"), str(fasta), str(gtf)]
    _run(argv, timeout_s=timeout_s, log_path=out_dir / "kb_ref.log")
    return {k: str(v) for k, v in paths.items()}



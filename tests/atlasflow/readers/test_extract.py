"""Archive extraction and decompression under kills and bombs (issue 16, points 3 and 4)."""

from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from atlasflow.core.fsutil import DecompressionLimit, gunzip_blocks
from atlasflow.readers.formats import DecompressionCap, FormatError, open_counts, read_counts, safe_extract
from atlasflow_testing.realdata import pbmc_counts, write_format

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def pbmc():
    return pbmc_counts()


def _zeros_tar_gz(path: Path, members: int, member_bytes: int) -> Path:
    """A small .tar.gz that extracts to ``members`` × ``member_bytes`` zeros (a disk bomb)."""
    with tarfile.open(path, "w:gz") as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"bomb/part{i:03d}.bin")
            info.size = member_bytes
            tar.addfile(info, io.BytesIO(bytes(member_bytes)))
    return path


def test_a_kill_mid_extraction_leaves_nothing_a_rerun_takes_for_whole(pbmc, tmp_path):
    """A process killed while writing the matrix member (a real signal: SIGXFSZ at a file-size limit)
    leaves no ``.extracted`` folder; the re-run extracts again and reads every cell."""
    archive = write_format(pbmc, "10x_mtx_tar", tmp_path / "raw")
    cache = tmp_path / "cache"
    with tarfile.open(archive) as tar:
        sizes = {Path(m.name).name: m.size for m in tar.getmembers() if m.isfile()}
    limit = max(sizes["barcodes.tsv.gz"], sizes["features.tsv.gz"]) + 1
    assert limit < sizes["matrix.mtx.gz"]
    child = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from atlasflow.readers.formats import open_counts\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; a real kill, as a shell would see\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "open_counts(Path(sys.argv[1]), cache=Path(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("include", "testing"))}
    done = subprocess.run([sys.executable, "-c", child, str(archive), str(cache)], env=env, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()[-2000:]
    assert not (cache / f"{archive.name}.extracted").exists()
    got = read_counts(archive, cache=cache)
    assert got.shape == pbmc.shape and (got.layers["counts"] != pbmc.X).nnz == 0
    assert archive.exists()


def test_a_tar_bomb_is_refused_while_streaming_with_its_figures(tmp_path):
    archive = _zeros_tar_gz(tmp_path / "bomb.tar.gz", members=16, member_bytes=4 * 10**6)  # 64 MB of zeros
    assert archive.stat().st_size < 200_000
    cap = 10 * 10**6
    with pytest.raises(FormatError) as info:
        open_counts(archive, cache=tmp_path / "cache", max_bytes=cap)
    message = str(info.value)
    assert message.startswith("bomb.tar.gz: extracting it needs over")
    assert f"{archive.stat().st_size}-byte archive" in message and f"the {cap} bytes" in message
    written = int(message.rsplit("stopped after ", 1)[1].split()[0])
    assert written <= cap  # refused before the member that would pass the cap was written
    assert not list((tmp_path / "cache").rglob("*.bin"))  # what it wrote is gone, nothing half-made kept
    assert not (tmp_path / "cache" / "bomb.tar.gz.extracted").exists()


def test_extraction_within_the_cap_is_complete(pbmc, tmp_path):
    archive = write_format(pbmc[:50], "10x_mtx_tar", tmp_path / "raw")
    got = read_counts(archive, cache=tmp_path / "cache", max_bytes=10 * archive.stat().st_size + 10**6)
    assert got.shape == (50, pbmc.shape[1])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{archive.name}.extracted"]


def test_gunzip_blocks_bounds_every_block_of_a_bomb():
    bomb = gzip.compress(bytes(40 * 2**20), compresslevel=9)  # ~40 KB → 40 MB
    blocks = gunzip_blocks(io.BytesIO(bomb), size=len(bomb))  # the whole stream in one read
    assert max(len(b) for b in blocks) <= 1 << 20
    with pytest.raises(DecompressionLimit) as info:
        for _ in gunzip_blocks(io.BytesIO(bomb), max_total=5 * 2**20):
            pass
    assert info.value.limit == 5 * 2**20 and info.value.seen > info.value.limit


def test_gunzip_blocks_still_reads_multi_member_streams_whole():
    data = [os.urandom(300_000), bytes(3 * 2**20), b"tail"]
    stream = b"".join(gzip.compress(d) for d in data)
    assert b"".join(gunzip_blocks(io.BytesIO(stream), size=4096, max_length=65536)) == b"".join(data)
    with pytest.raises(Exception, match="truncated"):
        b"".join(gunzip_blocks(io.BytesIO(stream[:-5])))


@pytest.mark.parametrize("fmt", ["10x_mtx_dir", "tsv_gz"])
def test_compressed_text_formats_are_refused_past_the_cap(pbmc, tmp_path, fmt):
    path = write_format(pbmc, fmt, tmp_path / "raw")
    with pytest.raises(FormatError, match=r"decompresses to over 100000 bytes \(100 KB\) from a [0-9]+-byte file, "
                                          r"more than the 100 KB ceiling \(readers\.max_decompressed_gb\); refused"):
        read_counts(path, cap=DecompressionCap(max_bytes=100_000))
    with pytest.raises(FormatError, match=r"more than 2x its size \(readers\.max_expansion_ratio\); refused"):
        read_counts(path, cap=DecompressionCap(max_ratio=2, floor_bytes=0))
    assert read_counts(path, cap=DecompressionCap(max_bytes=10**9)).shape == pbmc.shape  # control: a fitting cap
    # the text goes to memory, not disk: the disk reservation (max_bytes) no longer bounds it
    assert read_counts(path, max_bytes=100_000).shape == pbmc.shape


def test_decompression_cap_takes_the_tighter_rule_and_leaves_plain_files_alone(tmp_path):
    small, big, plain = tmp_path / "s.csv.gz", tmp_path / "b.csv.gz", tmp_path / "p.csv"
    small.write_bytes(gzip.compress(b"g,c\n"))
    big.write_bytes(gzip.compress(os.urandom(200_000)))
    plain.write_bytes(b"g,c\n" * 1000)
    cap = DecompressionCap(max_bytes=30 * 10**6, max_ratio=100)
    assert cap.limit(small) == (2**20, "the 1.0 MB any file may inflate to")  # a tiny file's ratio says nothing
    assert cap.limit(big) == (100 * big.stat().st_size, "100x its size (readers.max_expansion_ratio)")
    assert cap.limit(plain) == (None, "")  # reading it inflates nothing
    assert DecompressionCap(max_bytes=10**6, max_ratio=100).limit(big)[0] == 10**6


def test_a_gzipped_rds_bomb_is_refused_before_rds2py_inflates_it(tmp_path):
    path = tmp_path / "bomb.rds"
    path.write_bytes(gzip.compress(b"X\n" + bytes(20 * 2**20)))
    with pytest.raises(FormatError, match=r"bomb.rds: decompresses to over 1000000 bytes from a [0-9]+-byte file, "
                                          r"more than the 1.0 MB ceiling"):
        open_counts(path, cap=DecompressionCap(max_bytes=10**6))
    with pytest.raises(FormatError, match=r"bomb.rds: decompresses to over [0-9]+ bytes .* more than 200x its size"):
        open_counts(path)  # the defaults


def test_a_damaged_archive_names_the_file_and_leaves_no_partial(tmp_path):
    archive = _zeros_tar_gz(tmp_path / "a.tar.gz", members=2, member_bytes=10**5)
    archive.write_bytes(archive.read_bytes()[:-200])  # cut short
    with pytest.raises(FormatError, match="a.tar.gz: not a readable tar archive"):
        safe_extract(archive, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [archive]


def test_fastq_check_memory_is_bounded_on_a_bomb(tmp_path):
    """48 KB of gzip that inflates to one 48 MB line: checked in bounded memory, refused with the reason."""
    from atlasflow.acquire.quant import QuantError, check_fastq

    path = tmp_path / "reads_R1.fastq.gz"
    path.write_bytes(gzip.compress(b"@r1\n" + b"A" * (48 * 2**20), compresslevel=9))
    tracemalloc.start()
    try:
        with pytest.raises(QuantError, match="reads_R1.fastq.gz: "):
            check_fastq(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB"



def test_a_full_disk_is_not_blamed_on_the_archive(pbmc, tmp_path):
    """A write error of our own (here EFBIG at a file-size limit; ENOSPC alike) fails the task for a retry;
    it is never a FormatError, which would quarantine the dataset and delete its good download."""
    archive = write_format(pbmc, "10x_mtx_tar", tmp_path / "raw")
    child = (
        "import errno, resource, sys\n"
        "from pathlib import Path\n"
        "from atlasflow.readers.formats import FormatError, open_counts\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # SIGXFSZ is ignored: writes fail with EFBIG\n"
        "try:\n"
        "    open_counts(Path(sys.argv[1]), cache=Path(sys.argv[2]))\n"
        "except FormatError as exc:\n"
        "    sys.exit(f'FormatError: {exc}')\n"
        "except OSError as exc:\n"
        "    sys.exit(0 if exc.errno == errno.EFBIG else f'errno {exc.errno}')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("include", "testing"))}
    done = subprocess.run([sys.executable, "-c", child, str(archive), str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((tmp_path / "cache").iterdir())  # its partial extraction removed

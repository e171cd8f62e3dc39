"""Temporary names that record their owner, and pruning what dead owners left (issue 16 point 11)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from atlasflow.core.fsutil import discard_dir, owner_tag, partial_path, prune_stale_temps, write_text_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_stale_temporaries_of_dead_owners_are_pruned_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = _dead_pid()
    live = partial_path(tmp_path / "data" / "x.tar.gz.extracted")  # this process owns it
    live.mkdir(parents=True)
    (live / "matrix.mtx").write_bytes(b"0" * 1000)
    gone_dir = tmp_path / "data" / f"y.tar.gz.extracted.{dead}@{host}.partial"
    gone_dir.mkdir()
    (gone_dir / "matrix.mtx").write_bytes(b"0" * 1000)
    gone_file = tmp_path / "models" / f".progress.json.abc123.{dead}@{host}.tmp"
    gone_file.parent.mkdir()
    gone_file.write_text("{}")
    elsewhere = tmp_path / "models" / f".batch_0001.{dead}@another-node.tmp"  # cannot tell: kept while recent
    elsewhere.mkdir()
    legacy_old = tmp_path / "models" / ".result.json.k3j2.tmp"  # an older release's, without owner: old
    legacy_old.write_text("{}")
    os.utime(legacy_old, (time.time() - 3 * 86400,) * 2)
    legacy_new = tmp_path / "models" / ".state.json.q9z8.tmp"
    legacy_new.write_text("{}")
    keep = tmp_path / "models" / "batch_0000" / "model.pt"
    keep.parent.mkdir()
    keep.write_bytes(b"w")
    gone = prune_stale_temps(tmp_path)
    assert set(gone) == {gone_dir, gone_file, legacy_old}
    assert live.is_dir() and elsewhere.is_dir() and legacy_new.exists() and keep.exists()
    assert prune_stale_temps(tmp_path) == []


def test_write_text_atomic_names_its_temporary_after_its_owner(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_text_atomic(tmp_path / "a.json", "{}")
    assert seen and seen[0].startswith(".a.json.") and seen[0].endswith(f".{owner_tag()}.tmp")


def test_discard_dir_never_leaves_a_half_folder_under_its_name(tmp_path):
    """A kill during the deletion (here: a child killed after its rename, before its rmtree) leaves only
    an owner-named temporary, which pruning removes once that owner is dead."""
    folder = tmp_path / "batch_0000.partial"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}").write_bytes(b"x")
    child = ("import os, shutil, signal, sys\nfrom pathlib import Path\n"
             "from atlasflow.core.fsutil import discard_dir\n"
             "def killed(path, *a, **k):\n"
             "    if not Path(path).exists():\n"
             "        return\n"
             "    next(Path(path).iterdir()).unlink()\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "shutil.rmtree = killed\n"
             "discard_dir(Path(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode < 0, done.stderr
    assert not folder.exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".batch_0000.partial.") and leftover.name.endswith(".tmp")
    assert prune_stale_temps(tmp_path) == [leftover] and not list(tmp_path.iterdir())
    discard_dir(tmp_path / "absent")  # nothing to do

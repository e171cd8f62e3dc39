"""Which 10x chemistry a sample's reads are, for reads rows whose manifest leaves ``technology`` empty.

The way Cell Ranger's ``--chemistry auto`` decides: a length filter (the barcode + UMI read must
be at least as long as the chemistry's barcode + UMI: 26 bp for v2, 28 bp for v3), then the share
of sampled barcodes (the first 16 bases of read 1) found on each chemistry's barcode on-list. The
winner needs ``quant.detect_min_share`` of the sample on its list and ``quant.detect_margin`` times
the runner-up's share; otherwise the sample is *undecidable* and :class:`UndecidableChemistry`
carries the figures (reads sampled, read length, every share) into the quarantine reason.

On-lists come from ``quant.onlist_10xv2`` / ``quant.onlist_10xv3``, else the lists kb-python
installs (the ``ngs_tools`` package's 10x lists); never ``quant.onlist``, which is one list for
every chemistry and so cannot tell them apart. Only the sampled barcodes are
held in memory; an on-list is streamed once (the v3 list is 6.8 M lines).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlasflow.core.config import QuantConfig

__all__ = ["BARCODE_BP", "DETECTABLE", "Detection", "UndecidableChemistry", "detect_chemistry", "onlist_for"]

log = logging.getLogger(__name__)
BARCODE_BP = 16  # 10x v2 and v3 cell barcodes
# chemistry -> barcode + UMI length; the chemistries detection chooses between (Smart-seq2 has no barcode read)
DETECTABLE: dict[str, int] = {"10xv2": 16 + 10, "10xv3": 16 + 12}
# kb-python's own lists (installed with it by ngs_tools), used when the config names none
_KB_LISTS = {"10xv2": "10x_version2_whitelist.txt.gz", "10xv3": "10x_version3_whitelist.txt.gz"}
_MAX_LINE = 256  # an on-list line longer than this is not a barcode: the file is not an on-list
_BLOCK = 4 << 20


class UndecidableChemistry(ValueError):
    """The reads fit no chemistry clearly; ``detection`` holds the figures."""

    def __init__(self, message: str, detection: Detection) -> None:
        super().__init__(message)
        self.detection = detection


@dataclass(frozen=True)
class Detection:
    """What detection saw: reads sampled, read-1 lengths, and each candidate's on-list share."""

    chemistry: str | None
    reads_sampled: int
    r1_min_length: int
    r1_max_length: int
    shares: dict[str, float | None] = field(default_factory=dict)  # None: read 1 too short for it
    onlists: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def figures(self) -> str:
        """The figures as one phrase for a quarantine reason."""
        shares = ", ".join(
            f"{chem}: {'read 1 too short' if s is None else f'{100 * s:.1f}% on its on-list'}"
            for chem, s in self.shares.items())
        return (f"{self.reads_sampled} read-1 sequences of {self.r1_min_length}-{self.r1_max_length} bp sampled; "
                f"{shares}")


def onlist_for(chemistry: str, config: QuantConfig) -> str | None:
    """The on-list detection uses for ``chemistry``: the configured one, else kb-python's; None when neither."""
    configured = getattr(config, f"onlist_{chemistry}", None)
    if configured:
        return str(configured)
    spec = importlib.util.find_spec("ngs_tools")
    if spec is None or spec.origin is None or chemistry not in _KB_LISTS:
        return None
    path = Path(spec.origin).parent / "chemistry" / "whitelists" / _KB_LISTS[chemistry]
    return str(path) if path.is_file() else None


def _sample_r1(files: Sequence[Path], n: int) -> tuple[Counter[str], int, int, int]:
    """The barcodes (first 16 bases) of the first ``n`` read-1 records, and the reads' lengths."""
    barcodes: Counter[str] = Counter()
    taken, lo, hi = 0, 1 << 30, 0
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            while taken < n:
                # check_fastq has read the whole file already (four-line records, line lengths capped)
                header = fh.readline(1 << 20)
                seq = fh.readline(1 << 20).rstrip(b"\r\n")
                fh.readline(1 << 20)
                fh.readline(1 << 20)
                if not header:
                    break
                taken += 1
                lo, hi = min(lo, len(seq)), max(hi, len(seq))
                if len(seq) >= BARCODE_BP:
                    barcodes[seq[:BARCODE_BP].decode("ascii", "replace")] += 1
        if taken >= n:
            break
    return barcodes, taken, (lo if taken else 0), hi


def _on_list(barcodes: Counter[str], onlist: str) -> int:
    """How many sampled reads carry a barcode on ``onlist`` (the list is streamed in blocks, never held)."""
    wanted = {bc.encode("ascii", "replace") for bc in barcodes}
    found: set[bytes] = set()
    pending = b""
    opener = gzip.open if onlist.endswith(".gz") else open
    with opener(onlist, "rb") as fh:  # type: ignore[operator]
        while block := fh.read(_BLOCK):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            if len(pending) > _MAX_LINE:
                raise ValueError(f"{onlist}: a line longer than {_MAX_LINE} characters; not a barcode on-list")
            # set.intersection walks the block's lines in C: the 6.8 M-line v3 list in about a second
            found |= wanted.intersection(x.rstrip(b"\r") for x in lines) if b"\r" in block else \
                wanted.intersection(lines)
            if found == wanted:
                break
    found |= wanted.intersection([pending.strip()])
    return sum(barcodes[bc.decode("ascii")] for bc in found)


def detect_chemistry(r1_files: Sequence[Path], config: QuantConfig) -> Detection:
    """The 10x chemistry of a sample from its barcode + UMI reads (``r1_files``).

    Raises
    ------
    UndecidableChemistry
        No read 1, read 1 too short for any chemistry, too few barcodes on any on-list, or two
        chemistries too close to call; the message carries the figures.
    """
    barcodes, taken, lo, hi = _sample_r1(r1_files, config.detect_reads)
    shares: dict[str, float | None] = {}
    lists: dict[str, str] = {}
    missing: list[str] = []
    for chem, bp in DETECTABLE.items():
        if taken == 0 or lo < bp:
            shares[chem] = None
            continue
        onlist = onlist_for(chem, config)
        if onlist is None or not Path(onlist).is_file():
            missing.append(chem)
            shares[chem] = None
            continue
        lists[chem] = onlist
        shares[chem] = round(_on_list(barcodes, onlist) / taken, 4)
    base = {"reads_sampled": taken, "r1_min_length": lo, "r1_max_length": hi, "shares": shares, "onlists": lists}
    ranked = sorted(((s, c) for c, s in shares.items() if s is not None), reverse=True)

    def undecidable(why: str) -> UndecidableChemistry:
        found = Detection(None, **base)  # type: ignore[arg-type]
        return UndecidableChemistry(f"cannot detect the chemistry ({why}): {found.figures()}; set the row's "
                                    "technology (10xv2, 10xv3, smartseq2)", found)

    if taken == 0:
        raise undecidable("no reads in read 1")
    if missing and not ranked:
        raise undecidable(f"no barcode on-list for {', '.join(missing)} (set quant.onlist_<chemistry>)")
    if not ranked:
        need = ", ".join(f"{c} {bp} bp" for c, bp in DETECTABLE.items())
        raise undecidable(f"read 1 is shorter than any 10x barcode + UMI ({need})")
    best_share, best = ranked[0]
    if best_share < config.detect_min_share:
        raise undecidable(f"fewer than {100 * config.detect_min_share:g}% of barcodes on any on-list")
    if len(ranked) > 1 and best_share < config.detect_margin * ranked[1][0]:
        raise undecidable(f"{best} and {ranked[1][1]} are within a factor {config.detect_margin:g} of each other")
    found = Detection(best, **base)  # type: ignore[arg-type]
    log.info("detected chemistry %s: %s", best, found.figures())
    return found

"""CELLxGENE Discover as a source: dataset ids → their H5AD asset, through the public Curation API.

A ``type: cellxgene`` manifest row names a Discover dataset by its id (a UUID). The row is resolved
with ``GET {api}/datasets/{dataset_id}/versions`` (newest version first), whose entry lists the
dataset's ``assets`` (``filetype``, ``url``, ``filesize``) and curated metadata (``organism``,
``assay``, ``cell_count``, ``collection_id``). The H5AD asset is then downloaded by the ordinary
HTTP path (:func:`atlasflow.acquire.http.download`): resumable, hashed, never past the batch's
reservation, and never past the size the API announced. ``GET {api}/collections/{collection_id}``
lists a collection's datasets for ``atlasflow manifest from-cellxgene``.

Discover's H5AD files follow one schema (raw counts in ``raw.X`` or ``X``, Ensembl ids as
``var_names`` with symbols in ``var['feature_name']``, curated obs ``cell_type``, ``donor_id``,
``assay``, ``organism`` and their ``*_ontology_term_id`` columns). :func:`schema_dataset` maps it
onto the pipeline's columns: ``cell_type`` → the processed file's labels, ``donor_id`` → batch,
the API's organism → species (a non-human organism is refused before a byte is fetched unless
``genes.species_mapping`` maps it).

Every answer of the API is untrusted input: a missing H5AD asset, a body that is not the documented
JSON, an asset URL that is not http(s), a 404/410 all end in :class:`FetchError` naming the dataset
and the reason (the dataset is quarantined); 5xx, 429 and network errors are transient.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from atlasflow.acquire.http import FetchedFile, FetchError, TransientFetchError, download
from atlasflow.core.config import DownloadConfig
from atlasflow.intake.manifest import CELLXGENE_RE, Dataset

__all__ = [
    "BATCH_KEY",
    "LABEL_KEY",
    "CellxgeneDataset",
    "api_json",
    "fetch_cellxgene",
    "list_collection",
    "recorded_metadata",
    "resolve_dataset",
    "schema_dataset",
]

log = logging.getLogger(__name__)

# the schema's obs columns that become the processed file's batch and labels
BATCH_KEY = "donor_id"
LABEL_KEY = "cell_type"
H5AD = "H5AD"
# the API's answers are small JSON documents; a collection of a few hundred datasets is a few MB
MAX_ANSWER_BYTES = 64 << 20


@dataclass(frozen=True)
class CellxgeneDataset:
    """One Discover dataset (its newest published version) as the Curation API describes it."""

    dataset_id: str
    url: str  # the H5AD asset
    filesize: int | None
    dataset_version_id: str | None = None
    collection_id: str | None = None
    title: str | None = None
    organism: tuple[str, ...] = ()  # labels, e.g. "Homo sapiens"
    organism_ontology_term_id: tuple[str, ...] = ()  # e.g. "NCBITaxon:9606"
    assay: tuple[str, ...] = ()
    assay_ontology_term_id: tuple[str, ...] = ()
    tissue: tuple[str, ...] = ()
    disease: tuple[str, ...] = ()
    cell_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def species(self) -> str | None:
        """The organism as the manifest's ``species`` column spells it; None when several or none."""
        return self.organism[0] if len(self.organism) == 1 else None


def api_json(base_url: str, path: str, *, timeout_s: float, what: str) -> Any:
    """``GET {base_url}/{path}`` as parsed JSON.

    Raises
    ------
    FetchError
        404 or 410 (no such or a withdrawn object: ``what`` names it), other 4xx, a body that is
        not JSON or larger than :data:`MAX_ANSWER_BYTES`; :class:`TransientFetchError` for 5xx,
        429 and network errors.
    """
    url = f"{base_url.rstrip('/')}/{path.lstrip('/')}"
    req = urllib.request.Request(url, headers={"User-Agent": "atlasflow/0.1", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(f"CELLxGENE has no {what} (HTTP 404 from {url})") from exc
        if exc.code == 410:
            raise FetchError(f"CELLxGENE withdrew {what} (HTTP 410 from {url})") from exc
        if exc.code >= 500 or exc.code == 429:
            raise TransientFetchError(f"{url}: HTTP {exc.code}") from exc
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientFetchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    if len(body) > MAX_ANSWER_BYTES:
        raise FetchError(f"{url}: the answer for {what} is larger than {MAX_ANSWER_BYTES} bytes; not the API")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise FetchError(f"{url}: the answer for {what} is not JSON ({exc})") from exc


def _labels(entry: Mapping[str, Any], key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(labels, ontology term ids) of one of the API's ontology lists (``[{label, ontology_term_id}]``)."""
    items = entry.get(key) or []
    if not isinstance(items, list):
        raise ValueError(f"'{key}' is not a list")
    labels, ids = [], []
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError(f"'{key}' holds {type(item).__name__}, not objects")
        labels.append(str(item.get("label") or ""))
        ids.append(str(item.get("ontology_term_id") or ""))
    return tuple(labels), tuple(ids)


def parse_dataset(entry: Any, *, where: str) -> CellxgeneDataset:
    """A dataset entry of the API (``dataset``, ``dataset_version`` or ``dataset_index``) → its H5AD asset.

    Raises
    ------
    FetchError
        The entry is not the documented shape, has no H5AD asset, or its asset URL is not http(s).
    """
    if not isinstance(entry, Mapping):
        raise FetchError(f"{where}: expected a dataset object, got {type(entry).__name__}")
    dataset_id = entry.get("dataset_id")
    if not isinstance(dataset_id, str) or not CELLXGENE_RE.match(dataset_id):
        raise FetchError(f"{where}: the entry has no valid dataset_id ({dataset_id!r})")
    assets = entry.get("assets")
    if not isinstance(assets, list) or not all(isinstance(a, Mapping) for a in assets):
        raise FetchError(f"{where}: dataset {dataset_id} has no 'assets' list")
    h5ad = [a for a in assets if str(a.get("filetype", "")).upper() == H5AD]
    if not h5ad:
        kinds = ", ".join(sorted({str(a.get("filetype")) for a in assets})) or "none"
        raise FetchError(f"{where}: dataset {dataset_id} has no H5AD asset (assets: {kinds})")
    url = h5ad[0].get("url")
    if not isinstance(url, str) or urlsplit(url).scheme.lower() not in ("https", "http") or not urlsplit(url).hostname:
        raise FetchError(f"{where}: dataset {dataset_id}'s H5AD asset has no http(s) url ({url!r})")
    size = h5ad[0].get("filesize")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or size < 0):
        raise FetchError(f"{where}: dataset {dataset_id}'s H5AD filesize is not a byte count ({size!r})")
    count = entry.get("cell_count")
    try:
        organism, organism_ids = _labels(entry, "organism")
        assay, assay_ids = _labels(entry, "assay")
        tissue, _ = _labels(entry, "tissue")
        disease, _ = _labels(entry, "disease")
    except ValueError as exc:
        raise FetchError(f"{where}: dataset {dataset_id}: {exc}") from exc
    def text(key: str) -> str | None:
        return str(entry[key]) if isinstance(entry.get(key), str) else None

    return CellxgeneDataset(
        dataset_id=dataset_id, url=url, filesize=None if size is None else int(size),
        dataset_version_id=text("dataset_version_id"), collection_id=text("collection_id"), title=text("title"),
        organism=organism, organism_ontology_term_id=organism_ids, assay=assay, assay_ontology_term_id=assay_ids,
        tissue=tissue, disease=disease,
        cell_count=count if isinstance(count, int) and not isinstance(count, bool) else None)


def resolve_dataset(dataset_id: str, *, base_url: str, timeout_s: float = 60.0) -> CellxgeneDataset:
    """The newest published version of a Discover dataset and its H5AD asset.

    Raises
    ------
    FetchError
        Unknown or withdrawn id, no published version, an answer not in the documented shape, no
        H5AD asset; :class:`TransientFetchError` when the API is unreachable or failing.
    """
    if not CELLXGENE_RE.match(dataset_id):
        raise FetchError(f"{dataset_id!r} is not a CELLxGENE dataset id")
    what = f"dataset {dataset_id}"
    versions = api_json(base_url, f"datasets/{quote(dataset_id)}/versions", timeout_s=timeout_s, what=what)
    if isinstance(versions, Mapping) and isinstance(versions.get("datasets"), list):
        versions = versions["datasets"]  # the API's first v1 release wrapped the list
    if not isinstance(versions, list):
        raise FetchError(f"CELLxGENE's versions of {what}: expected a list, got {type(versions).__name__}")
    if not versions:
        raise FetchError(f"CELLxGENE lists no published version of {what}")
    found = parse_dataset(versions[0], where=f"CELLxGENE {what}")  # reverse-chronological: the newest first
    if found.dataset_id != dataset_id:
        raise FetchError(f"CELLxGENE answered for {what} with dataset {found.dataset_id}")
    return found


def list_collection(collection_id: str, *, base_url: str,
                    timeout_s: float = 60.0) -> tuple[str | None, list[CellxgeneDataset], list[str]]:
    """``(collection name, datasets with an H5AD asset, reasons others were left out)`` of a collection.

    Raises
    ------
    FetchError
        Unknown collection, or an answer not in the documented shape.
    """
    if not CELLXGENE_RE.match(collection_id):
        raise FetchError(f"{collection_id!r} is not a CELLxGENE collection id (a UUID)")
    what = f"collection {collection_id}"
    body = api_json(base_url, f"collections/{quote(collection_id)}", timeout_s=timeout_s, what=what)
    if not isinstance(body, Mapping) or not isinstance(body.get("datasets"), list):
        raise FetchError(f"CELLxGENE {what}: expected an object with a 'datasets' list")
    found, left_out = [], []
    for k, entry in enumerate(body["datasets"]):
        try:
            found.append(parse_dataset(entry, where=f"CELLxGENE {what}, dataset #{k + 1}"))
        except FetchError as exc:
            left_out.append(str(exc))
    name = body.get("name") if isinstance(body.get("name"), str) else None
    return name, found, left_out


def fetch_cellxgene(
    dataset: Dataset,
    dest_dir: Path,
    *,
    config: DownloadConfig,
    max_bytes: int | None,
    accept_species: Callable[[str], str | None] | None = None,
    **kw: Any,
) -> tuple[list[FetchedFile], dict[str, Any]]:
    """Resolve a ``cellxgene`` row and download its H5AD into ``dest_dir``.

    Parameters
    ----------
    accept_species
        Called with the organism the API lists when the manifest gives no ``species``; returns None
        to accept it, else why such a dataset cannot be used (then nothing is downloaded).
    kw
        ``attempts``, ``backoff_s``, ``timeout_s`` for :func:`~atlasflow.acquire.http.download`.

    Returns
    -------
    The downloaded file and the resolved metadata (kept in ``fetch.json`` under ``cellxgene``).
    """
    found = resolve_dataset(dataset.download_url, base_url=config.cellxgene_api_url, timeout_s=config.read_timeout_s)
    where = f"{dataset.dataset_id} (CELLxGENE dataset {found.dataset_id})"
    if not dataset.species and accept_species is not None:
        if len(found.organism) != 1:
            raise FetchError(f"{where}: CELLxGENE lists {len(found.organism)} organisms "
                             f"({', '.join(found.organism) or 'none'}); set the row's species to use it")
        if (why := accept_species(found.organism[0])) is not None:
            raise FetchError(f"{where}: not human: CELLxGENE lists organism {found.organism[0]!r} "
                             f"({found.organism_ontology_term_id[0]}); {why}")
    cap = max_bytes
    if found.filesize is not None:
        if max_bytes is not None and found.filesize > max_bytes:
            raise FetchError(f"{where}: its H5AD is {found.filesize} bytes, more than the {max_bytes} reserved for "
                             "this dataset; set expected_bytes (atlasflow manifest from-cellxgene writes it)")
        cap = found.filesize  # never more than the API announced
    fetched = download(found.url, dest_dir, name=f"{found.dataset_id}.h5ad", max_bytes=cap, sha256=dataset.sha256,
                       md5=dataset.md5, **kw)
    if found.filesize is not None and fetched.bytes != found.filesize:
        for path in (Path(fetched.path), dest_dir / f"{fetched.name}.done.json"):
            path.unlink(missing_ok=True)
        raise FetchError(f"{where}: {fetched.bytes} bytes arrived but CELLxGENE announced {found.filesize}; "
                         "the file was deleted")
    return [fetched], found.to_dict()


def recorded_metadata(raw_dir: Path) -> dict[str, Any]:
    """What :func:`fetch_cellxgene` recorded in ``raw_dir/fetch.json`` (``{}`` when nothing)."""
    try:
        data = json.loads((raw_dir / "fetch.json").read_text())
    except (OSError, ValueError):
        return {}
    meta = data.get("cellxgene") if isinstance(data, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def schema_dataset(dataset: Dataset, raw_dir: Path) -> Dataset:
    """A ``cellxgene`` row with the schema's columns filled in where the manifest leaves them empty.

    ``batch_key`` ← ``donor_id``, ``cell_type_key`` ← ``cell_type`` (the labels the probe and the
    cell-type head read), ``species`` ← the organism recorded at download, ``tissue_type`` and
    ``disease_status`` ← the API's tissue and disease when the dataset has exactly one of each.
    Other rows are returned unchanged.
    """
    if dataset.type != "cellxgene":
        return dataset
    meta = recorded_metadata(raw_dir)

    def single(key: str) -> str | None:
        values = meta.get(key)
        return str(values[0]) if isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 1 \
            else None

    return dataclasses.replace(
        dataset,
        batch_key=dataset.batch_key or BATCH_KEY,
        cell_type_key=dataset.cell_type_key or LABEL_KEY,
        species=dataset.species or single("organism"),
        tissue_type=dataset.tissue_type or single("tissue"),
        disease_status=dataset.disease_status or single("disease"),
    )

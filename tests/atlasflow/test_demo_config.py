"""``make demo``'s config (``python -m atlasflow_testing.demo``): its budget keeps the demo's promise
with the model-artefact reservation computed from the model (no ``storage.checkpoint_gb`` override):
each batch fits next to what the previous one leaves, two batches never fit together."""

from __future__ import annotations

from atlasflow.core.config import load_config
from atlasflow.model.sizing import model_artifacts
from atlasflow.prep.genes import Vocabulary
from atlasflow.steps import ingest as P
from atlasflow.storage import Ledger
from atlasflow_testing.demo import DEMO_BUDGET_MB, main


def test_the_demo_budget_admits_one_batch_at_a_time(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "--url", "http://127.0.0.1:9"]) == 0
    config = load_config(tmp_path / "atlasflow.yaml")
    assert config.storage.checkpoint_gb is None and config.storage.max_storage_gb * 1000 == DEMO_BUDGET_MB
    budget = config.storage.max_storage_bytes
    batches = P.prepare_run(config)["batches"]
    n_genes = len(Vocabulary.load(config.genes.vocab_path))
    ledger = Ledger(config.storage)
    footprints = []
    for batch_id in batches:
        admission = P.admit_batch(config, batch_id, owner="test")
        assert admission["admitted"] and admission["footprint"]["model_artifacts"]["source"] == "computed"
        footprints.append(admission["footprint"])
        ledger.release(batch_id)
    assert len(footprints) == 3
    for i in range(1, len(footprints)):
        before, now = footprints[i - 1], footprints[i]
        # what batch i-1 leaves on disk at most: its checkpoint once, its integration output
        art = model_artifacts(config, n_genes, batches=i)
        cells = before["model_artifacts"]["cells"]
        kept = art.checkpoint.total(i) + art.scvi_model + art.scoring_pool(cells) + cells * art.latent_per_cell
        assert kept + now["bytes"] <= budget, (i, kept, now["bytes"], budget)
        assert before["bytes"] + now["bytes"] > budget, (i, before["bytes"], now["bytes"], budget)

from __future__ import annotations

import sys

from atlasflow.slurm import JobSpec, JobState
from atlasflow.slurm.backend import LocalBackend

SCRIPT = (
    "import json,os,sys\n"
    "code=int(sys.argv[1]); print('hello')\n"
    "json.dump({'checkpoint': 'ck'}, open(os.environ['ATLASFLOW_RESULT_PATH'],'w')) if code==0 else None\n"
    "sys.exit(code)\n"
)


def _spec(tmp_path, code: int) -> JobSpec:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return JobSpec(dataset_id="d", batch_id="b", command=(sys.executable, str(script), str(code)),
                   output_dir=str(tmp_path / "out"), tag="af-1")


def test_local_backend_success_writes_result(tmp_path):
    res = LocalBackend().run(_spec(tmp_path, 0))
    assert res.info.state is JobState.COMPLETED and res.result == {"checkpoint": "ck"}
    assert "hello" in open(_spec(tmp_path, 0).stdout_path).read()


def test_local_backend_failure_has_exit_code(tmp_path):
    res = LocalBackend().run(_spec(tmp_path, 3))
    assert res.info.state is JobState.FAILED and res.info.exit_code == 3 and res.result is None

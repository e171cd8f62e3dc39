"""50 SLURM jobs polled concurrently: SSH connections opened and slurmctld RPCs per minute.

ours:  50 SlurmJobTrigger.run() in one event loop, as in a triggerer: they share one poller, i.e. one
       SSH connection and one batched `squeue --jobs=a,b,…` per cycle (backoff poll_min_s→poll_max_s)
ours_fixed_interval: the same with poll_min_s = poll_max_s = naive's interval (no backoff), to show
       what batching alone saves
naive: 50 loops that each open a new SSH connection every `interval` seconds and run `squeue -j ID`

Runs against scripts/local-slurm (started if needed, stopped again if this script started it).
RPCs come from `sdiag` (reset before each phase; sdiag's own REQUEST_STATS_INFO excluded).
Connections are counted by the clients and, as a cross-check, from the sshd log ("Accepted publickey").
Writes benchmarks/results/slurm_polling.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_JOBS = int(os.environ.get("BENCH_SLURM_JOBS", 50))
PHASE_S = float(os.environ.get("BENCH_SLURM_PHASE_S", 60))
NAIVE_INTERVAL_S = 5.0


def _rpc_total(sdiag: str) -> int:
    section = sdiag.split("Remote Procedure Call statistics by message type", 1)[-1]
    section = section.split("Remote Procedure Call statistics by user", 1)[0]
    return sum(int(m.group(2)) for m in re.finditer(r"^\s*(\w+)\s*\(\s*\d+\)\s*count:(\d+)", section, re.M)
               if m.group(1) != "REQUEST_STATS_INFO")


async def _ours(job_ids: list[str], poll_max_s: float = 300) -> dict:
    from atlasflow_airflow.triggers.slurm import SlurmJobTrigger

    triggers = [SlurmJobTrigger(job_id=j, conn_id="slurm_ssh", stdout_path="/dev/null", stderr_path="/dev/null",
                                result_path="/dev/null", poll_min_s=5, poll_max_s=poll_max_s) for j in job_ids]
    tasks = [asyncio.create_task(anext(t.run())) for t in triggers]
    await asyncio.sleep(PHASE_S)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pollers = {id(t.poller): t.poller for t in triggers if t.poller is not None}
    return {"connections": sum(p.connections_opened for p in pollers.values()), "pollers": len(pollers),
            "cycles": sum(p.cycles for p in pollers.values())}


async def _ours_fixed_interval(job_ids: list[str]) -> dict:
    return await _ours(job_ids, poll_max_s=NAIVE_INTERVAL_S)


async def _naive(job_ids: list[str]) -> dict:
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    opened = 0

    async def loop(job_id: str) -> None:
        nonlocal opened
        while True:
            async with await SSHHookAsync(ssh_conn_id="slurm_ssh").get_conn() as conn:
                opened += 1
                await conn.run(f"squeue -h -j {job_id}", check=False)
            await asyncio.sleep(NAIVE_INTERVAL_S)

    tasks = [asyncio.create_task(loop(j)) for j in job_ids]
    await asyncio.sleep(PHASE_S)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"connections": opened}


def main() -> dict:
    import logging

    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    state = Path(os.environ.get("LOCAL_SLURM_STATE", REPO / ".local-slurm"))
    ls = [sys.executable, str(REPO / "scripts" / "local-slurm")]
    was_up = subprocess.run([*ls, "status", "--state-dir", state], capture_output=True).returncode == 0
    subprocess.run([*ls, "start", "--state-dir", state], check=True)
    cluster = json.loads((state / "connection.json").read_text())
    home = tempfile.mkdtemp(prefix="bench-airflow-")
    os.environ.setdefault("AIRFLOW_HOME", home)
    os.environ["AIRFLOW_CONN_SLURM_SSH"] = json.dumps({
        "conn_type": "ssh", "host": cluster["host"], "port": cluster["port"], "login": cluster["user"],
        "extra": {"key_file": cluster["key_file"], "known_hosts": cluster["known_hosts"]}})
    env = {**os.environ, "SLURM_CONF": cluster["slurm_conf"]}
    out_dir = Path(cluster["jobs_dir"]) / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    job_ids = []
    for i in range(N_JOBS):
        r = subprocess.run(["sbatch", "--parsable", "-o", str(out_dir / f"b{i}-%j.out"), "--comment=bench",
                            "--wrap", f"sleep {int(3 * PHASE_S)}"], capture_output=True, text=True, env=env,
                           check=True)
        job_ids.append(r.stdout.strip().split(";")[0])
    sshd_log = state / "log" / "sshd.log"

    def accepted() -> int:
        return sshd_log.read_text(errors="replace").count("Accepted publickey") if sshd_log.exists() else 0

    phases = {}
    try:
        for name, fn in (("ours", _ours), ("ours_fixed_interval", _ours_fixed_interval), ("naive", _naive)):
            subprocess.run(["sdiag", "-r"], env=env, capture_output=True, check=True)
            before = accepted()
            t0 = time.monotonic()
            res = asyncio.run(fn(job_ids))
            minutes = (time.monotonic() - t0) / 60
            rpcs = _rpc_total(subprocess.run(["sdiag"], env=env, capture_output=True, text=True).stdout)
            phases[name] = {"connections_per_min": round(res["connections"] / minutes, 1),
                            "sshd_accepted_per_min": round((accepted() - before) / minutes, 1),
                            "rpcs_per_min": round(rpcs / minutes, 1), "minutes": round(minutes, 2),
                            **{k: v for k, v in res.items() if k != "connections"}}
    finally:
        subprocess.run(["scancel", *job_ids], env=env, capture_output=True)
        if not was_up:
            subprocess.run([*ls, "stop", "--state-dir", state])
    ours, naive = phases["ours"], phases["naive"]
    result = {
        "jobs": N_JOBS, "phase_s": PHASE_S, "naive_interval_s": NAIVE_INTERVAL_S,
        "ours": ours, "ours_fixed_interval": phases["ours_fixed_interval"], "naive": naive,
        "connections_ratio": round(naive["connections_per_min"] / max(ours["connections_per_min"], 1e-9), 1),
        "rpcs_ratio": round(naive["rpcs_per_min"] / max(ours["rpcs_per_min"], 1e-9), 1),
        "rpcs_ratio_fixed_interval": round(
            naive["rpcs_per_min"] / max(phases["ours_fixed_interval"]["rpcs_per_min"], 1e-9), 1),
    }
    dest = REPO / "benchmarks" / "results" / "slurm_polling.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

#!/usr/bin/env python
"""Run a real local Airflow (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1.

    airflow_local.py start   [--api-port 8080] [--timeout 180]   (or AIRFLOW_LOCAL_API_PORT)
    airflow_local.py status
    airflow_local.py trigger DAG_ID [--conf JSON] [--wait] [--timeout 1800]
    airflow_local.py clear DAG_ID RUN_ID --group batch_0001 [--downstream] [--wait]
    airflow_local.py wait DAG_ID RUN_ID [--timeout 1800]
    airflow_local.py wait-next DAG_ID --since EPOCH_S [--run-type asset_triggered] [--timeout 600]
    airflow_local.py tasks DAG_ID
    airflow_local.py stop

With ``AIRFLOW__CORE__EXECUTOR=CeleryExecutor`` (and ``AIRFLOW__CELERY__BROKER_URL``), ``start`` also
runs a Celery worker (``airflow celery worker``, concurrency ``AIRFLOW__CORE__PARALLELISM``) as a
fifth component, recorded and stopped like the others.

``start`` while some components run starts only the missing ones (e.g. a scheduler that died),
on the same ports; the workers a dead component left behind are stopped with everything else.

Every process binds 127.0.0.1, its port is checked for being free before
start, and its PID is recorded under ``$AIRFLOW_HOME/local/``; ``stop`` ends exactly those PIDs
(process groups it started), never anything found by name. Uses the environment of
``scripts/airflow_env.sh`` (SQLite + LocalExecutor by default) — source it first, or let
``make demo`` do it. Standard library only, so it also runs outside the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def components() -> tuple[str, ...]:
    """The processes to run: with the CeleryExecutor the tasks run in a Celery worker, so start one."""
    executor = os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    return COMPONENTS + (("celery-worker",) if "CeleryExecutor" in executor else ())


def home() -> Path:
    try:
        return Path(os.environ["AIRFLOW_HOME"])
    except KeyError:
        raise SystemExit("AIRFLOW_HOME is not set: source scripts/airflow_env.sh first") from None


def state_dir() -> Path:
    path = home() / "local"
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    # a killed daemon can linger as a zombie; that is not alive
    return "\nState:\tZ" not in status


def read_state() -> dict[str, Any]:
    path = state_dir() / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(state: dict[str, Any]) -> None:
    path = state_dir() / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def api_url(state: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{state['api_port']}"


def request(state: dict[str, Any], method: str, path: str, body: Any = None, token: str | None = None,
            timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api_url(state) + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else None


def password() -> str:
    path = home() / "simple_auth_manager_passwords.json.generated"
    return json.loads(path.read_text())["admin"]


def token(state: dict[str, Any]) -> str:
    return request(state, "POST", "/auth/token", {"username": "admin", "password": password()})["access_token"]


def start(args: argparse.Namespace) -> int:
    state = read_state()
    running = {c: p for c, p in state.get("pids", {}).items() if alive(p)}
    if running and len(running) == len(components()):
        print(f"already running: {', '.join(f'{c} (pid {p})' for c, p in running.items())}")
        return 0
    if running:
        return restart_missing(state, running)
    api_port = args.api_port
    if not port_free(api_port):
        raise SystemExit(f"port {api_port} on 127.0.0.1 is busy; pass --api-port or set AIRFLOW_LOCAL_API_PORT")
    worker_log_port, trigger_log_port = free_port(), free_port()
    env = component_env(api_port, worker_log_port, trigger_log_port)
    logs = state_dir()
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True)
    if migrate.returncode != 0:
        raise SystemExit(f"airflow db migrate failed:\n{(migrate.stdout + migrate.stderr)[-3000:]}")
    pids = {component: launch(component, env, api_port) for component in components()}
    state = {"pids": pids, "api_port": api_port, "log_ports": [worker_log_port, trigger_log_port],
             "started": time.time()}
    write_state(state)
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        dead = [c for c, p in pids.items() if not alive(p)]
        if dead:
            stop(argparse.Namespace())
            raise SystemExit(f"{', '.join(dead)} exited during start; see {logs}/<component>.log")
        try:
            health = request(state, "GET", "/api/v2/monitor/health", timeout=5)
            if health.get("scheduler", {}).get("status") == "healthy":
                # The Execution API (what task processes call) builds itself on its first request: 2.6 s on
                # an idle machine, 5-6 s while the scheduler lays out a run. Paid here, not by the first tasks.
                request(state, "GET", "/execution/health", timeout=60)
                print(f"Airflow UI: {api_url(state)}  (user admin, password {password()}); logs in {logs}")
                return 0
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(2)
    stop(argparse.Namespace())
    raise SystemExit(f"Airflow did not become healthy within {args.timeout} s; see {logs}")


def component_env(api_port: int, worker_log_port: int, trigger_log_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(worker_log_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_log_port),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # the component logs are files: unbuffered, so `tail -f` (and a test) sees each line when it happens
        "PYTHONUNBUFFERED": "1",
    }


def launch(component: str, env: dict[str, str], api_port: int) -> int:
    cmd = [sys.executable, "-m", "airflow", component]
    if component == "api-server":
        cmd += ["--host", "127.0.0.1", "--port", str(api_port)]
    elif component in ("scheduler", "triggerer"):
        # Airflow's log server has no host setting and listens on every interface; the task and trigger
        # logs are files under this machine's $AIRFLOW_HOME/logs, which the api-server reads directly.
        cmd.append("--skip-serve-logs")
    elif component == "celery-worker":
        # Logs are read from this machine's $AIRFLOW_HOME/logs, so the worker needs no log server
        # (which would listen on every interface).
        cmd = [sys.executable, "-m", "airflow", "celery", "worker", "--skip-serve-logs",
               "--concurrency", env.get("AIRFLOW__CORE__PARALLELISM", "4")]
    log = (state_dir() / f"{component}.log").open("ab")
    # own session: stop() can signal the component and every worker it forked, and nothing else
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def restart_missing(state: dict[str, Any], running: dict[str, int]) -> int:
    """Start the components that died, on the recorded ports; remember their old process groups."""
    env = component_env(state["api_port"], *state["log_ports"])
    for component in components():
        if component in running:
            continue
        old = state["pids"].get(component)
        if old is not None:
            # workers the dead component forked live on in its process group: stop() ends them too
            state.setdefault("old_groups", []).append(old)
        state["pids"][component] = launch(component, env, state["api_port"])
        print(f"restarted {component} (pid {state['pids'][component]})")
    write_state(state)
    return 0


def group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(args: argparse.Namespace) -> int:
    state = read_state()
    pids = state.get("pids", {})
    for pgid in state.get("old_groups", []):
        if group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in pids.values():
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in pids.values()):
        time.sleep(0.5)
    for pid in pids.values():
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # SIGKILL is not instant on a loaded machine: return only once they are gone, so a caller that
    # checks right after (or starts again on the same ports) never sees a half-dead component
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in pids.values()):
        time.sleep(0.2)
    if left := [f"{c} (pid {p})" for c, p in pids.items() if alive(p)]:
        print(f"still alive after SIGKILL: {', '.join(left)}", file=sys.stderr)
        return 1
    if pids:
        print(f"stopped {', '.join(f'{c} (pid {p})' for c, p in pids.items())}")
    write_state({})
    return 0


def status(args: argparse.Namespace) -> int:
    state = read_state()
    if not state.get("pids"):
        print("not running")
        return 3
    for component, pid in state["pids"].items():
        print(f"{component:<14} pid {pid:<8} {'running' if alive(pid) else 'dead'}")
    print(f"UI: {api_url(state)}")
    return 0 if all(alive(p) for p in state["pids"].values()) else 1


def unpause_when_parsed(state: dict[str, Any], dag_id: str, parse_timeout: float) -> str:
    """Wait until the dag-processor has serialised ``dag_id`` (a moment after start), unpause it; returns a token."""
    if not state.get("pids"):
        raise SystemExit("Airflow is not running: start it first")
    tok = token(state)
    deadline = time.time() + parse_timeout
    while True:
        try:
            request(state, "GET", f"/api/v2/dags/{dag_id}", token=tok)
            break
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.time() > deadline:
                raise SystemExit(f"DAG {dag_id} not available: HTTP {exc.code}") from None
            time.sleep(2)
    request(state, "PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token=tok)
    return tok


def unpause(args: argparse.Namespace) -> int:
    unpause_when_parsed(read_state(), args.dag_id, args.parse_timeout)
    print(f"unpaused {args.dag_id}")
    return 0


def trigger(args: argparse.Namespace) -> int:
    state = read_state()
    tok = unpause_when_parsed(state, args.dag_id, args.parse_timeout)
    run = request(state, "POST", f"/api/v2/dags/{args.dag_id}/dagRuns",
                  {"logical_date": None, "conf": json.loads(args.conf)}, token=tok)
    run_id = run["dag_run_id"]
    print(f"triggered {args.dag_id} run {run_id}")
    return wait_run(state, args.dag_id, run_id, args.timeout) if args.wait else 0


def wait_run(state: dict[str, Any], dag_id: str, run_id: str, timeout: float) -> int:
    deadline = time.time() + timeout
    run: dict[str, Any] = {}
    while time.time() < deadline:
        tok = token(state)  # tokens expire; a long run outlives one
        run = request(state, "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", token=tok)
        if run["state"] in ("success", "failed"):
            print(f"run {run_id}: {run['state']}")
            return 0 if run["state"] == "success" else 1
        time.sleep(3)
    print(f"run {run_id} still {run.get('state')} after {timeout} s")
    return 1


def wait(args: argparse.Namespace) -> int:
    return wait_run(read_state(), args.dag_id, args.run_id, args.timeout)


def wait_next(args: argparse.Namespace) -> int:
    """Wait for the first run of DAG_ID (of ``--run-type``) due at or after ``--since``, then for it to finish.

    For a run the scheduler creates by itself, e.g. atlas_retrain's run on the model Asset that an
    atlas_ingest run's ``publish`` updated: the caller passes when it triggered that ingest run.
    """
    state = read_state()
    since = datetime.fromtimestamp(args.since, UTC)
    deadline = time.time() + args.timeout
    query = urllib.parse.urlencode({"run_type": args.run_type, "run_after_gte": since.isoformat(),
                                    "order_by": "run_after", "limit": 1})
    while time.time() < deadline:
        due = request(state, "GET", f"/api/v2/dags/{args.dag_id}/dagRuns?{query}", token=token(state))["dag_runs"]
        if due:
            print(f"{args.dag_id} run {due[0]['dag_run_id']} ({args.run_type}) started by itself; waiting for it")
            return wait_run(state, args.dag_id, due[0]["dag_run_id"], max(deadline - time.time(), 1))
        time.sleep(3)
    print(f"no {args.run_type} run of {args.dag_id} due since {since.isoformat()} within {args.timeout} s")
    return 1


def tasks(args: argparse.Namespace) -> int:
    """Print the task ids of the DAG as the api-server serves it now (after the last parse)."""
    state = read_state()
    try:
        found = request(state, "GET", f"/api/v2/dags/{args.dag_id}/tasks", token=token(state))["tasks"]
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"DAG {args.dag_id} not available: HTTP {exc.code}") from None
    print("\n".join(sorted(t["task_id"] for t in found)))
    return 0


def clear(args: argparse.Namespace) -> int:
    """Clear one batch group of a run (what the UI's "Clear" on a task group does), via the REST API."""
    state = read_state()
    tok = token(state)
    tasks = request(state, "GET", f"/api/v2/dags/{args.dag_id}/tasks", token=tok)["tasks"]
    task_ids = [t["task_id"] for t in tasks if t["task_id"].startswith(args.group + ".")]
    if not task_ids:
        raise SystemExit(f"no task group {args.group!r} in {args.dag_id}")
    body = {"dag_run_id": args.run_id, "task_ids": task_ids, "dry_run": False, "only_failed": False,
            "include_downstream": args.downstream, "include_upstream": False, "reset_dag_runs": True}
    cleared = request(state, "POST", f"/api/v2/dags/{args.dag_id}/clearTaskInstances", body, token=tok)
    print(f"cleared {cleared['total_entries']} task instances of {args.group} in {args.run_id}")
    return wait_run(state, args.dag_id, args.run_id, args.timeout) if args.wait else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start")
    p.add_argument("--api-port", type=int, default=int(os.environ.get("AIRFLOW_LOCAL_API_PORT", "8080")))
    p.add_argument("--timeout", type=float, default=180)
    p.set_defaults(func=start)
    sub.add_parser("stop").set_defaults(func=stop)
    sub.add_parser("status").set_defaults(func=status)
    p = sub.add_parser("trigger")
    p.add_argument("dag_id")
    p.add_argument("--conf", default="{}")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--parse-timeout", type=float, default=120)
    p.set_defaults(func=trigger)
    p = sub.add_parser("unpause", help="unpause a DAG (e.g. atlas_retrain) once it is parsed")
    p.add_argument("dag_id")
    p.add_argument("--parse-timeout", type=float, default=120)
    p.set_defaults(func=unpause)
    p = sub.add_parser("wait")
    p.add_argument("dag_id")
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(func=wait)
    p = sub.add_parser("wait-next", help="wait for a run the scheduler starts by itself (e.g. on an Asset)")
    p.add_argument("dag_id")
    p.add_argument("--since", type=float, required=True, help="epoch seconds: only runs due from then on")
    p.add_argument("--run-type", default="asset_triggered")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=wait_next)
    p = sub.add_parser("tasks")
    p.add_argument("dag_id")
    p.set_defaults(func=tasks)
    p = sub.add_parser("clear")
    p.add_argument("dag_id")
    p.add_argument("run_id")
    p.add_argument("--group", required=True, help="task group, e.g. batch_0001")
    p.add_argument("--downstream", action="store_true", help="also clear what depends on it (later batches)")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(func=clear)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

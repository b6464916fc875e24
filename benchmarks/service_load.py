"""Load test of the HTTP service on loopback: N concurrent clients, mixed requests.

Starts ``bitalloc serve`` in a subprocess on a fresh database, uploads a few tables, then runs
``--requests`` requests from ``--clients`` threads (each with its own keep-alive connection):
solves (stored and not), plan/table reads, lists, frontiers, exports, health and deduplicated
uploads. Prints p50/p99 per request kind and overall, the error count (exit 1 if any), and the
HTTP overhead of a solve as a ratio to the same solve called in-process (the baseline,
measured in the same run).

    python benchmarks/service_load.py                      # 32 clients, 10k requests, SQLite
    python benchmarks/service_load.py --db postgresql://postgres@127.0.0.1:54329/bitalloc_test
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

# benchmarks/solvers.py would shadow the solvers package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import numpy as np  # noqa: E402

TOKEN = "load-test-token-0123456789"
MIX = {  # kind → weight
    "solve": 25, "solve_nostore": 10, "get_plan": 10, "get_table": 10, "list_tables": 5,
    "list_plans": 5, "frontier": 10, "export": 5, "health": 10, "upload_dedup": 5, "version": 5,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(db: str, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "allocator.cli", "serve", "--db", db, "--port", str(port),
           "--token", TOKEN, "--workers", str(workers), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}")


def _setup(url: str, n_tables: int, n_units: int) -> tuple[list[str], list[str], list[bytes]]:
    from allocator.core.synth import synth_table
    from allocator.service.parquet import table_to_parquet

    h = {"Authorization": f"Bearer {TOKEN}"}
    tables, plans, blobs = [], [], []
    for seed in range(n_tables):
        blob = table_to_parquet(synth_table(n_units=n_units, n_options=5, seed=seed))
        t = httpx.post(f"{url}/v1/tables", files={"file": ("t.parquet", blob)}, headers=h).json()
        tables.append(t["id"])
        blobs.append(blob)
        plans.append(httpx.post(f"{url}/v1/plans", json={"table_id": t["id"], "budget": {"bpw": 4.0}},
                                headers=h).json()["id"])
    return tables, plans, blobs


def _one(http: httpx.Client, kind: str, rng: random.Random, tables: list[str], plans: list[str],
         blobs: list[bytes]) -> httpx.Response:
    t = rng.choice(tables)
    bpw = round(rng.uniform(2.5, 6.0), 3)
    if kind == "solve":
        r = http.post("/v1/plans", json={"table_id": t, "budget": {"bpw": bpw}})
        if r.status_code == 201:
            plans.append(r.json()["id"])
        return r
    if kind == "solve_nostore":
        return http.post("/v1/plans", json={"table_id": t, "budget": {"bpw": bpw}, "store": False})
    if kind == "get_plan":
        return http.get(f"/v1/plans/{rng.choice(plans)}")
    if kind == "get_table":
        return http.get(f"/v1/tables/{t}")
    if kind == "list_tables":
        return http.get("/v1/tables", params={"limit": 20})
    if kind == "list_plans":
        return http.get("/v1/plans", params={"limit": 20, "table_id": t})
    if kind == "frontier":
        return http.get(f"/v1/tables/{t}/frontier")
    if kind == "export":
        return http.get(f"/v1/plans/{rng.choice(plans[:len(tables)])}/export",
                        params={"target": "llamacpp", "lossy": True})
    if kind == "upload_dedup":
        return http.post("/v1/tables", files={"file": ("t.parquet", rng.choice(blobs))})
    return http.get(f"/v1/{kind}")


def _baseline(n_units: int, reps: int = 200) -> float:
    """p50 seconds of the same solve called in-process (no HTTP, no database)."""
    import solvers
    from allocator.core.budget import Budget
    from allocator.core.synth import synth_table

    table = synth_table(n_units=n_units, n_options=5, seed=0)
    rng = random.Random(0)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        solvers.solve(table, Budget(bpw=round(rng.uniform(2.5, 6.0), 3)))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--units", type=int, default=64, help="units per synthetic table")
    ap.add_argument("--workers", type=int, default=0, help="job workers next to the server")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-load-"))
    db = args.db or f"sqlite:///{tmp / 'load.db'}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(db, port, args.workers, tmp / "server.log")
    try:
        tables, plans, blobs = _setup(url, args.tables, args.units)
        unloaded = _unloaded(url)
        kinds = list(MIX)
        weights = [MIX[k] for k in kinds]
        lat: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
                for _ in counter:  # shared iterator: exactly --requests in total
                    kind = rng.choices(kinds, weights)[0]
                    t0 = time.perf_counter()
                    try:
                        r = _one(http, kind, rng, tables, plans, blobs)
                        ok = r.status_code < 400
                        why = f"{kind}: {r.status_code} {r.text[:120]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, f"{kind}: {type(exc).__name__} {exc}"
                    dt = time.perf_counter() - t0
                    with lock:
                        lat[kind].append(dt)
                        if not ok:
                            errors.append(why)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    every = np.concatenate([np.asarray(v) for v in lat.values()]) * 1e3
    print(f"{sum(map(len, lat.values()))} requests, {args.clients} clients, {wall:.1f} s "
          f"({len(every) / wall:.0f} req/s), db={db.split(':')[0]}, errors={len(errors)}")
    print(f"{'kind':<14} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in kinds:
        v = np.asarray(lat[kind]) * 1e3
        if len(v):
            print(f"{kind:<14} {len(v):>6} {np.percentile(v, 50):>8.2f} {np.percentile(v, 99):>8.2f}")
    print(f"{'ALL':<14} {len(every):>6} {np.percentile(every, 50):>8.2f} {np.percentile(every, 99):>8.2f}")
    base = _baseline(args.units) * 1e3
    solve50 = float(np.percentile(np.asarray(lat["solve_nostore"]) * 1e3, 50))
    print(f"baseline: in-process solve p50 {base:.2f} ms; HTTP solve (no store) p50 under load "
          f"{solve50:.2f} ms = {solve50 / base:.1f}x the baseline")
    print("unloaded, one client, sequential: " + ", ".join(f"{k} {v:.2f} ms" for k, v in unloaded.items()))
    for e in errors[:10]:
        print("error:", e)
    return 1 if errors else 0


def _unloaded(url: str, n: int = 200) -> dict[str, float]:
    """Mean round trip of cheap routes from one client before the load (queueing-free cost)."""
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        for path in ("/v1/health", "/v1/version", "/v1/tables"):
            http.get(path)
            t0 = time.perf_counter()
            for _ in range(n):
                http.get(path).raise_for_status()
            out[path] = (time.perf_counter() - t0) / n * 1e3
    return out


if __name__ == "__main__":
    os.environ.pop("BITALLOC_TOKEN", None)
    sys.exit(main())

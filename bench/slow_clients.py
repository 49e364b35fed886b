"""``/health`` while slow clients hold connections: the real ``osprey-label serve`` (waitress) on the
tiny random-weight models, probed alone and then with ``--clients`` raw connections that each send one
byte per second and never finish (half trickle their headers, half a webhook body).

Label Studio marks a backend whose ``/health`` takes over 1 s as disconnected; the target is every
probe answered within 1 s. One row per situation, both measured in the same run: probes sent,
answered (HTTP 200 within ``--timeout``), answered within 1 s, median and max latency.

    python bench/slow_clients.py                    # 50 slow clients, 40 probes per row
    python bench/slow_clients.py --clients 200 --probes 100
    python bench/slow_clients.py --json             # one JSON object per row
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving import SlowClients, start_backend, tiny_backend_env  # noqa: E402


def probe(url: str, probes: int, timeout_s: float, pause_s: float) -> dict:
    """``probes`` sequential ``GET /health``; latencies of the answered ones."""
    latencies, failures = [], 0
    for _ in range(probes):
        started = time.perf_counter()
        try:
            ok = requests.get(f"{url}/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
        time.sleep(pause_s)
    return {
        "probes": probes,
        "answered": len(latencies),
        "within_1s": sum(latency <= 1.0 for latency in latencies),
        "median_s": statistics.median(latencies) if latencies else None,
        "max_s": max(latencies) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="slow connections (default 50)")
    parser.add_argument("--probes", type=int, default=40, help="/health probes per row (default 40)")
    parser.add_argument("--timeout", type=float, default=5.0, help="probe timeout in seconds (default 5)")
    parser.add_argument("--threads", default="8", help="THREADS of the server (default 8)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="osprey-slow-clients-"))
    env = {**tiny_backend_env(work / "models", LOG_LEVEL="WARNING"), "THREADS": args.threads}
    process, url = start_backend(env, work / "serve.log")
    rows = []
    try:
        rows.append({"situation": "no slow clients", **probe(url, args.probes, args.timeout, 0.05)})
        with SlowClients(url, args.clients, interval_s=1.0) as clients:
            time.sleep(3)  # every connection has sent bytes (a thread-per-connection server is stuck here)
            row = probe(url, args.probes, args.timeout, 0.05)
            rows.append(
                {"situation": f"{args.clients} slow clients (1 byte/s)", **row, "open": clients.open_count()}
            )
    finally:
        process.stop()

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(
        f"osprey-label serve (waitress), tiny models, THREADS={args.threads}; /health probes, timeout {args.timeout:g} s"
    )
    print(
        f"{'situation':<32} {'probes':>6} {'answered':>8} {'<= 1 s':>6} {'median s':>9} {'max s':>7} {'open':>5}"
    )
    for row in rows:
        median = f"{row['median_s']:.4f}" if row["median_s"] is not None else "-"
        worst = f"{row['max_s']:.4f}" if row["max_s"] is not None else "-"
        print(
            f"{row['situation']:<32} {row['probes']:>6} {row['answered']:>8} {row['within_1s']:>6} "
            f"{median:>9} {worst:>7} {row.get('open', '-'):>5}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

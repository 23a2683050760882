"""wandb in offline mode (the default logger): one run folder per job with the config, the metrics and the results
table, written with no network and no account; a resumed job is not logged twice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1", "eval.ppl=false"]


class ConnectionCounter:
    """A TCP listener on the loopback interface that counts (and closes) every connection made to it: the address
    wandb's server and every proxy are pointed at, so any network attempt is counted. Stops with the test."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_offline_wandb_writes_its_run_folder_without_network(tmp_path):
    server = ConnectionCounter()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_BASE_URL": server.url, "HTTPS_PROXY": server.url,
           "HTTP_PROXY": server.url, "WANDB_API_KEY": "", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "masquant", "hydra.verbose=false", *TINY, "method=rtn", "quant=w8a8",
           f"paths.output_root={tmp_path}/o", f"paths.cache_dir={tmp_path}/c"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        server.close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert server.connections == 0  # no attempt to reach wandb's server, directly or through a proxy

    (folder,) = (tmp_path / "o" / "wandb").glob("offline-run-*")
    result_dir = next((tmp_path / "o" / "runs").rglob("rtn/*/metrics.json")).parent
    metrics = json.loads((result_dir / "metrics.json").read_text())
    assert json.loads((result_dir / "wandb.json").read_text())["folder"] == str(folder)
    # the results table: the dense reference and the job, with the job's SQNR
    (table_file,) = (folder / "files" / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["method"] for r in rows] == ["dense", "rtn"]
    assert rows[1]["SQNR text (dB)"] == metrics["fidelity/sqnr/text/e2e"] and rows[0]["SQNR text (dB)"] is None
    # the run's records: its config (with provenance) and its metrics
    (records,) = folder.glob("run-*.wandb")
    data = records.read_bytes()
    for expected in (metrics["run/config_hash"], "fidelity/sqnr/text/e2e", "git_commit", "tiny-qwen2.5-vl"):
        assert expected.encode() in data, expected
    logs = " ".join(p.read_text(errors="replace") for p in folder.rglob("*.log"))
    assert "127.0.0.1:9" not in logs and "connection refused" not in logs.lower()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "was logged already" in again.stdout + again.stderr
    assert len(list((tmp_path / "o" / "wandb").glob("offline-run-*"))) == 1


"""The peers' training runs for the quality benchmarks: long-lived workers in the peers' venv, and a
seal that lets a rerun of the table reuse a peer's outputs instead of training it again.

A peer's run is a pure function of its job (library, settings, shape, budget, seed, threads), the
bytes of its training and held-out rows, peer_train.py and the packages of the peers' venv: nothing
in saeflow reaches it. Rerunning the whole table after a change to saeflow's defaults (issue 29's
rule) therefore retrains the peers to the same bits (the v6 and v7 tables' 74 peer rows were
identical) at about two thirds of the table's training time. A finished run is sealed with a key
over all of those inputs and the SHA-256 of each output file; a later job with the same key reuses
the outputs after verifying every digest, and anything else (a changed input, a missing or altered
file, no seal) trains again. The seal is written last, by rename, so a run stopped half-way is
never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from storage.registry import file_sha256

HERE = Path(__file__).parent
OUTPUTS = ("recon", "decoder", "fires")  # what peer_train.py writes beside a job, per budget


def output_files(job_path: Path, tokens: int, snapshots) -> dict[int, dict[str, Path]]:
    """Each budget's output files: the job's own for `tokens`, JOB.<budget>.*.npy for a snapshot."""
    found = {}
    for budget in [*snapshots, tokens]:
        at = job_path if budget == tokens else job_path.with_suffix(f".{budget}.json")
        found[budget] = {key: at.with_suffix(f".{key}.npy") for key in OUTPUTS}
    return found


class PeerWorkers:
    """One long-lived peer_train.py --serve process per library, inside the peers' venv; `run` reuses
    a sealed run whose inputs are all unchanged (`fresh=True`: always train)."""

    def __init__(self, python: str, work: Path, fresh: bool = False):
        self.python, self.work, self.fresh, self.procs = python, work, fresh, {}
        self._digests: dict[tuple, str] = {}
        self._environment: str | None = None

    def run(self, library: str, job_path: Path) -> bool:
        """Trains the job written at `job_path` (or reuses its sealed outputs); True when reused."""
        job = json.loads(job_path.read_text())
        seal = job_path.with_suffix(".sealed.json")
        key = self.key(job)
        if not self.fresh and self.sealed(seal, key):
            return True
        seal.unlink(missing_ok=True)  # the outputs are about to be overwritten
        self.train(library, job_path)
        files = [
            p
            for budget in output_files(job_path, job["tokens"], job.get("snapshots", ())).values()
            for p in budget.values()
        ]
        record = {"key": key, "files": {p.name: file_sha256(p) for p in files}}
        partial = seal.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, seal)
        return False

    def sealed(self, seal: Path, key: str) -> bool:
        if not seal.exists():
            return False
        record = json.loads(seal.read_text())
        if record["key"] != key:
            return False
        for name, digest in record["files"].items():
            path = seal.parent / name
            if not path.exists() or file_sha256(path) != digest:
                print(f"{path}: changed since its run was sealed; training the peer again", flush=True)
                return False
        return True

    def key(self, job: dict) -> str:
        """SHA-256 over everything a peer's run depends on: the job with its data files replaced by
        their contents' digests, peer_train.py, and the peers' installed packages."""
        inputs = {k: (self.data_digest(Path(v)) if k in ("train", "held") else v) for k, v in job.items()}
        inputs["peer_train.py"] = file_sha256(HERE / "peer_train.py")
        inputs["environment"] = self.environment()
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def data_digest(self, path: Path) -> str:
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)  # a cell's rows are shared by its many jobs
        if memo not in self._digests:
            self._digests[memo] = file_sha256(path)
        return self._digests[memo]

    def environment(self) -> str:
        if self._environment is None:
            frozen = subprocess.run(
                [self.python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
            ).stdout
            self._environment = hashlib.sha256(frozen.encode()).hexdigest()
        return self._environment

    def train(self, library: str, job_path: Path) -> None:
        proc = self.procs.get(library)
        if proc is None:
            log = open(self.work / f"{library}.log", "a")
            proc = self.procs[library] = subprocess.Popen(
                [self.python, str(HERE / "peer_train.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        proc.stdin.write(f"{job_path}\n")
        proc.stdin.flush()
        reply = proc.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"{library}: {reply or 'the worker exited'} (log: {self.work / (library + '.log')})")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)

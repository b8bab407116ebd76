"""benchmarks/peer_runs.py: a peer's sealed run is reused only when every input and output is unchanged."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from peer_runs import PeerWorkers, output_files  # noqa: E402


class CountingWorkers(PeerWorkers):
    """The seal logic as is; training writes outputs derived from the job and counts its calls."""

    def __init__(self, work: Path, fail: bool = False, **kwargs):
        super().__init__(sys.executable, work, **kwargs)
        self.trained, self.fail = 0, fail

    def environment(self) -> str:
        return "test-environment"

    def train(self, library: str, job_path: Path) -> None:
        self.trained += 1
        job = json.loads(job_path.read_text())
        rows = np.load(job["train"])
        for budget, files in output_files(job_path, job["tokens"], job["snapshots"]).items():
            files["recon"].write_bytes(b"")  # half-written, then completed below unless the run fails
            if self.fail:
                raise RuntimeError("the worker exited")
            np.save(files["recon"], rows * budget)
            np.save(files["decoder"], rows.T)
            np.save(files["fires"], np.arange(budget % 7))


@pytest.fixture
def job(tmp_path) -> Path:
    train = tmp_path / "train.npy"
    np.save(train, np.arange(12, dtype=np.float32).reshape(4, 3))
    path = tmp_path / "cell-sparsify-defaults-400-s0.json"
    path.write_text(json.dumps(dict(library="sparsify", tokens=400, snapshots=[100, 200], train=str(train), seed=0)))
    return path


def outputs(job: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for b in output_files(job, 400, [100, 200]).values() for p in b.values()}


def test_a_sealed_run_is_reused_with_its_outputs(job, tmp_path):
    first = CountingWorkers(tmp_path)
    assert first.run("sparsify", job) is False and first.trained == 1
    made = outputs(job)
    again = CountingWorkers(tmp_path)  # a later benchmark run: a new process
    assert again.run("sparsify", job) is True and again.trained == 0
    assert outputs(job) == made


def test_a_changed_job_data_file_or_output_trains_again(job, tmp_path):
    CountingWorkers(tmp_path).run("sparsify", job)
    changed = json.loads(job.read_text())
    job.write_text(json.dumps(dict(changed, seed=1)))  # another seed: another run
    assert CountingWorkers(tmp_path).run("sparsify", job) is False
    train = Path(changed["train"])  # same job, one byte of its rows changed
    data = train.read_bytes()
    train.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert CountingWorkers(tmp_path).run("sparsify", job) is False
    snapshot = output_files(job, 400, [100, 200])[100]["fires"]  # an output altered after the seal
    np.save(snapshot, np.arange(5) + 1)
    workers = CountingWorkers(tmp_path)
    assert workers.run("sparsify", job) is False and workers.trained == 1
    assert CountingWorkers(tmp_path).run("sparsify", job) is True


def test_a_run_that_fails_half_way_leaves_no_seal(job, tmp_path):
    CountingWorkers(tmp_path).run("sparsify", job)
    changed = json.loads(job.read_text())
    job.write_text(json.dumps(dict(changed, seed=2)))
    with pytest.raises(RuntimeError, match="the worker exited"):
        CountingWorkers(tmp_path, fail=True).run("sparsify", job)
    assert not job.with_suffix(".sealed.json").exists()
    job.write_text(json.dumps(changed))  # even the first job's seal went with its overwritten outputs
    assert CountingWorkers(tmp_path).run("sparsify", job) is False


def test_fresh_always_trains(job, tmp_path):
    CountingWorkers(tmp_path).run("sparsify", job)
    workers = CountingWorkers(tmp_path, fresh=True)
    assert workers.run("sparsify", job) is False and workers.trained == 1


def test_the_key_covers_the_peers_packages(job, tmp_path, monkeypatch):
    workers = CountingWorkers(tmp_path)
    before = workers.key(json.loads(job.read_text()))
    monkeypatch.setattr(workers, "environment", lambda: "another-environment")
    assert workers.key(json.loads(job.read_text())) != before

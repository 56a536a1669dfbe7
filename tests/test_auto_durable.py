"""Issue 15, item 4: a search survives a worker killed mid-trial (SIGKILL), losing only that worker's trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from fxcompress.auto.search import PID_ATTR, open_storage

ROOT = Path(__file__).resolve().parents[1]

#: A model file whose evaluate hangs once, in the first worker to start a second trial: the test kills it there.
MODEL_FILE = textwrap.dedent(
    """\
    import os, time
    from pathlib import Path
    import torch
    from fxcompress.examples import SmallCNN, accuracy

    torch.manual_seed(0)
    _MODEL = SmallCNN().eval()
    _X = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _Y = _MODEL(_X).argmax(1)
    _MARKS = Path(os.environ["FXCOMPRESS_TEST_MARKS"])

    def model():
        return _MODEL

    def example_inputs():
        return (_X[:1],)

    def evaluate(m):
        if (_MARKS / f"done-{os.getpid()}").exists():
            try:
                fd = os.open(_MARKS / "victim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(300)  # killed here
        (_MARKS / f"done-{os.getpid()}").touch()
        return accuracy(m, _X, _Y)
    """
)


def _study(storage: Path) -> optuna.Study:
    return optuna.load_study(study_name="durable", storage=open_storage(storage))


def _wait_for(path: Path, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


@pytest.mark.slow  # ~10 s: a real worker process killed mid-trial; the default run keeps under 5 minutes
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_worker_killed_mid_trial_loses_only_its_trial(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE, encoding="utf-8")
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fxcompress", "auto", str(tmp_path / "model.py"), "--workers", "2",
               "--trials", "6", "--study", "durable", "--budget", "macs=2", "--json", str(out / "result.json"),
               "--heartbeat-interval", "0.3", "--grace-period", "1.5"]
    env = {**os.environ, "FXCOMPRESS_TEST_MARKS": str(marks), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _wait_for(marks / "victim", process, 60)
        victim = int((marks / "victim").read_text())
        storage = out / "durable.journal"  # the default storage: in the output folder, kept
        completed_before = {t.number: t.value for t in _study(storage).get_trials(
            states=(optuna.trial.TrialState.COMPLETE,))}
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr

    study = _study(storage)
    completed = {t.number: t.value for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert completed_before and completed_before.items() <= completed.items()  # nothing completed was lost
    assert len(completed) >= 6
    assert study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) == []
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.user_attrs[PID_ATTR] for t in failed] == [victim]  # the killed trial, failed by heartbeat
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params  # and queued again
    result = json.loads((out / "result.json").read_text())
    assert result["value"] == max(completed.values())
    assert "study 'durable' in" in stdout


def test_resume_continues_the_study_in_the_output_folder(tmp_path, monkeypatch):
    import warnings

    from fxcompress.cli import main

    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FXCOMPRESS_TEST_MARKS", str(marks))
    (tmp_path / "model.py").write_text(MODEL_FILE.replace("if (_MARKS", "if False and (_MARKS"), encoding="utf-8")
    common = [str(tmp_path / "model.py"), "--study", "durable", "--json", str(tmp_path / "out" / "r.json")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["auto", *common, "--trials", "3"]) == 0
        first = {t.number: t.value for t in _study(tmp_path / "out" / "durable.journal").trials}
        assert main(["auto", *common, "--trials", "5", "--resume"]) == 0
    trials = _study(tmp_path / "out" / "durable.journal").trials
    assert len(first) == 3 and len(trials) == 5
    assert {t.number: t.value for t in trials[:3]} == first

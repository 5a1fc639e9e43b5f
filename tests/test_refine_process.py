"""Refine as a real process: SIGKILL after a checkpoint then --resume; data parallel over 2 CPU processes.

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (multi-CPU there means
mpirun with --mpirun_hostfile); `--multi_gpu --num_processes 2` with `--device cpu` starts two through
torchrun and they train data parallel over gloo. That is what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_refine import COLOURS, CORRECTIONS, QUESTION, eval_file, lesion, seed_store, settings_for, versions

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--quiet", "--device", "cpu", "--gold-holdout", "0", "--min-new", "1", "--lora-dropout", "0",
        "--learning-rate", "0.01", "--eval-max-new-tokens", "8", "--eval-metrics", "rouge,repetition"]


def _env(home: Path, model: Path) -> dict:
    env = dict(os.environ, DERMALOOP_HOME=str(home), DERMALOOP_MODEL=str(model), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _prepare(home: Path, model: Path) -> tuple[Path, dict]:
    settings = settings_for(home, model)
    seeded = seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS, CORRECTIONS)], base=str(model))
    return eval_file(home / "syn"), seeded


@pytest.mark.slow
def test_killed_run_registers_nothing_and_resumes(tiny_model_dir, dermaloop_home):
    from training.refine.run import main

    evals, _ = _prepare(dermaloop_home, tiny_model_dir)
    args = [*ARGS, "--synthetic-eval", str(evals), "--steps", "150", "--save-steps", "10", "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "training.refine", *args], cwd=ROOT, env=_env(dermaloop_home, tiny_model_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    try:
        while not list(dermaloop_home.glob("runs/*/checkpoints/step-*/state.json")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    settings = settings_for(dermaloop_home, tiny_model_dir)
    assert versions(settings) == {"v1": "active"}  # nothing half-registered
    assert not [p for p in (dermaloop_home / "models").glob("*") if p.name != "v1"] if (dermaloop_home / "models").exists() else True
    run_dir = next(dermaloop_home.glob("runs/*"))
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"

    # The killed process's lock is stale (its pid is dead): --resume takes it over and finishes the run.
    os.environ["DERMALOOP_MODEL"] = str(tiny_model_dir)
    try:
        assert main([*ARGS, "--resume"]) == 0
    finally:
        del os.environ["DERMALOOP_MODEL"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["resumed_from"] >= 10 and report["training"]["steps"] == 150
    assert report["training"]["losses"][0][0] == 1 and report["training"]["losses"][-1][0] == 150  # one curve across the kill
    assert set(versions(settings)) == {"v1", "v2"}
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_model_dir, dermaloop_home):
    evals, seeded = _prepare(dermaloop_home, tiny_model_dir)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "training.refine", *ARGS, "--synthetic-eval", str(evals), "--steps", "30",
           "--batch-size", "3", "--save-steps", "0", "--force"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(dermaloop_home, tiny_model_dir), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "on 2 process(es)" in res.stdout
    assert res.stdout.count("refine: v2 promoted") == 1
    settings = settings_for(dermaloop_home, tiny_model_dir)
    assert versions(settings) == {"v1": "retired", "v2": "active"}
    run_dir = next(dermaloop_home.glob("runs/*"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["examples_per_s"] > 0 and report["training"]["losses"][-1][0] == 30

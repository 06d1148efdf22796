"""A decomposition stopped at any point goes on with ``--resume`` and writes the modules a run that never stopped
writes, byte for byte; under torchrun a worker that dies is restarted and the run completes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _free_port, assert_user_error, run, train_small_cnn
from safetensors.torch import load

from cnnmod.artifacts import WEIGHTS
from cnnmod.jobs.checkpoints import DecompositionState


@pytest.fixture
def model_dir(tmp_path: Path, npz_data: str, capsys) -> Path:
    out = tmp_path / "model"
    train_small_cnn(out, npz_data, capsys, epochs=3)
    return out


def weights(out: Path) -> dict[str, bytes]:
    """Every module's weights file in a decomposition folder, as bytes."""
    found = {p.parent.name: p.read_bytes() for p in sorted((out / "modules").glob(f"*/{WEIGHTS}"))}
    assert found
    return found


def stopped(args: list[str], part: str, after: int, monkeypatch, capsys) -> Path:
    """``cnnmod decompose ARGS``, stopped (as by Ctrl-C) once it has kept its ``after``-th part whose name starts
    with ``part``; the state folder it leaves."""
    real_write, real_module, count = DecompositionState.write, DecompositionState.keep_module, [0]

    def counted(name: str) -> None:
        if name.startswith(part):
            count[0] += 1
            if count[0] == after:
                raise KeyboardInterrupt

    def write(self, name, config, tensors):
        real_write(self, name, config, tensors)
        counted(name)

    def keep_module(self, module):
        real_module(self, module)
        counted(f"module-c{module.concerned:05d}")

    monkeypatch.setattr(DecompositionState, "write", write)
    monkeypatch.setattr(DecompositionState, "keep_module", keep_module)
    rc, _, err = run(["decompose", *args], capsys)
    monkeypatch.undo()
    assert rc == 130, err
    out = Path(args[args.index("--out") + 1])
    state = out.with_name(out.name + ".resume")
    assert not out.exists() and state.is_dir()
    return state


@pytest.mark.parametrize("how,part,after", [
    (["--variant", "mc-bi"], "observed-", 2),  # node-level: the observation pass, two classes of three observed
    (["--granularity", "channel"], "pruning-together", 2),  # slim: two joint pruning steps done
    (["--granularity", "channel"], "module-", 1),  # slim: the steps done and one module made
])
def test_a_stopped_decomposition_resumes_to_the_same_modules(model_dir, tmp_path, monkeypatch, capsys, how, part,
                                                             after):
    whole = tmp_path / "whole"
    rc, _, err = run(["decompose", str(model_dir), "--out", str(whole), *how], capsys)
    assert rc == 0, err
    assert not (tmp_path / "whole.resume").exists()  # removed once the decomposition is written

    args = [str(model_dir), "--out", str(tmp_path / "dec"), *how]
    state = stopped(args, part, after, monkeypatch, capsys)
    kept = sorted(p.name for p in state.iterdir())
    assert len([k for k in kept if k.startswith(part)]) == (1 if part == "pruning-together" else after), kept
    # without --resume the kept parts are neither thrown away nor gone on with by mistake
    assert_user_error(*run(["decompose", *args], capsys), "add --resume")
    # with other settings they are refused
    assert_user_error(*run(["decompose", *args, "--seed", "1", "--resume"], capsys), "other settings", "seed")
    rc, _, err = run(["decompose", *args, "--resume"], capsys)
    assert rc == 0, err
    assert weights(tmp_path / "dec") == weights(whole)
    assert not state.exists()


def test_a_damaged_part_is_refused_not_read(model_dir, tmp_path, monkeypatch, capsys):
    args = [str(model_dir), "--out", str(tmp_path / "dec"), "--variant", "mc-bi"]
    state = stopped(args, "observed-", 1, monkeypatch, capsys)
    part = next(state.glob(f"observed-*/{WEIGHTS}"))
    part.write_bytes(part.read_bytes()[:-8])
    assert_user_error(*run(["decompose", *args, "--resume"], capsys), "checksum", "overwrite")
    rc, _, err = run(["decompose", *args, "--overwrite"], capsys)  # starts again
    assert rc == 0, err and not state.exists()


KILLER = """
import os, sys
from cnnmod.jobs.checkpoints import DecompositionState
from cnnmod.cli import main

real = DecompositionState.keep_module

def keep_module(self, module):
    real(self, module)
    if os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(9)  # the worker dies at once, as a preempted machine's would

DecompositionState.keep_module = keep_module
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_restarts_a_worker_that_died_and_the_run_completes(model_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    # torchrun spreads slim modules one by one over its processes: the same modules as one process makes them
    how = ["--granularity", "channel", "--set", "budget=module", "--batch-size", "7", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs: the same sums in the same order
    try:
        rc, _, err = run(["decompose", str(model_dir), "--out", str(whole), *how], capsys)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), "decompose", str(model_dir),
           "--out", str(tmp_path / "ddp"), *how, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exitcode: 9) local_rank: 1" in proc.stderr  # the worker died, and the run went on without it
    assert not (tmp_path / "ddp.resume").exists()
    # the modules' networks bit for bit; their calibrations' typical values are fitted sharded over the
    # processes, so to rounding (as tests/test_modules_cli.py's torchrun test has them)
    for name, data in weights(tmp_path / "ddp").items():
        a, b = load(data), load(weights(whole)[name])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if not k.startswith("typical.") else torch.allclose(a[k], b[k], 1e-5, 1e-6)

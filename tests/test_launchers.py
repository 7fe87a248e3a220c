"""The launch recipes of the README on this CPU machine: `accelerate launch` forming one sharded 2-process run, and two
"machines" of one process each (accelerate launch --num_machines 2, and its torchrun equivalent) over gloo."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, tiny_teacher


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch`, on this interpreter
TRAIN = str(REPO_ROOT / "examples" / "train_sida.py")


def train_flags(tmp_path, out):
    if not (tmp_path / "teacher").exists():
        tiny_teacher().save_pretrained(tmp_path / "teacher")
    return ["--teacher", str(tmp_path / "teacher"), "--train_data", "digits", "--resolution", "8",
            "--train_batch_size", "4", "--warmup_kimg", "0", "--adversarial_start_kimg", "0",
            "--max_train_kimg", "0.016", "--checkpointing_kimg", "1", "--log_every_kimg", "0.008", "--lr", "1e-3",
            "--glr", "1e-3", "--sample_grid_size", "0", "--seed", "5", "--output_dir", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def finished_two_process_run(out, proc_output: str):
    assert "2 process(es) x B=4 x R=1 rounds = 8 images per iteration" in proc_output, proc_output[-3000:]
    info = json.loads((out / "pipeline" / "run_info.json").read_text())
    assert (info["num_processes"], info["cur_nimg"]) == (2, 16)
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_accelerate_launch_use_fsdp_forms_one_sharded_two_process_run(tmp_path):
    # `--use_fsdp` makes accelerate start the processes with torchrun (its simple launcher, which `--num_processes`
    # alone uses on a machine without a GPU, starts one); the trainer maps Accelerate's FSDP onto --fsdp.
    out = tmp_path / "run"
    proc = subprocess.run([*ACCELERATE, "--use_fsdp", "--num_processes", "2", TRAIN,
                           *train_flags(tmp_path, out)], env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished_two_process_run(out, proc.stdout)
    assert "networks sharded (FSDP)" in proc.stdout
    assert json.loads((out / "config.json").read_text())["fsdp"] is True


@pytest.mark.slow
def test_accelerate_launch_without_multi_gpu_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*ACCELERATE, "--num_processes", "2", TRAIN, *train_flags(tmp_path, out),
                           "--fsdp"], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("train_sida: error:")]
    assert len(line) == 1 and "--multi_gpu --num_processes 2" in line[0], proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_two_machines_of_one_process_each_with_accelerate_and_with_torchrun(tmp_path):
    results = {}
    for launcher in ("accelerate", "torchrun"):
        out, port = tmp_path / launcher, free_port()
        commands = []
        for rank in (0, 1):
            if launcher == "accelerate":
                head = [*ACCELERATE, "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port",
                        str(port)]
            else:
                head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                        "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
            commands.append(head + [TRAIN, *train_flags(tmp_path, out), "--fsdp"])
        procs = [subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        outputs = [p.communicate(timeout=400) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs[0][1][-2000:] + outputs[1][1][-2000:]
        results[launcher] = finished_two_process_run(out, outputs[0][0])
    # the same run, whichever launcher formed it
    assert [r["g_loss"] for r in results["accelerate"]] == [r["g_loss"] for r in results["torchrun"]]

"""The GPU benchmarks run in their CPU `--tiny` mode, and their full-size networks are the official architectures."""

import json
import sys

import pytest

from conftest import REPO_ROOT, full_size_shapes


sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_sample  # noqa: E402
import bench_train  # noqa: E402


TRAIN_KEYS = {"preset", "device", "precision", "tf32", "channels_last", "compile", "train_batch_size", "img_per_s",
              "s_per_kimg", "s_per_iter", "peak_alloc_gb", "peak_reserved_gb", "phase_ms", "phase_calls", "stage",
              "timed_nimg", "params_per_net", "losses", "finite"}


def printed_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tiny_training_benchmark_times_the_real_stage3_step(capsys):
    record = bench_train.main(["--tiny", "--preset", "edm2-xs", "--warmup", "1", "--iters", "2"])
    assert printed_json(capsys) == record and TRAIN_KEYS <= set(record)
    assert (record["device"], record["train_batch_size"], record["precision"]) == ("cpu", 4, "fp32")
    # what is timed is SiDATrainer.step() in stage 3: every iteration runs both phases and the EMA once, advances
    # the image count by the batch, and produces all four losses of SiDA
    assert record["stage"] == 3 and record["timed_nimg"] == 2 * 4
    assert record["phase_calls"] == {"fake_score_phase": 2, "generator_phase": 2, "ema": 2}
    assert set(record["losses"]) == {"fake_score_loss", "d_loss", "g_loss", "g_gan_loss"} and record["finite"]
    teacher = bench_train.build_teacher("edm2-xs", tiny=True)  # the generator is the teacher without its logvar head
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert record["params_per_net"] == count(teacher) - count(teacher.logvar_linear)
    # the figures are consistent with each other: throughput from the step time, phases inside the step
    assert record["img_per_s"] == pytest.approx(4 / record["s_per_iter"], rel=1e-2)
    assert record["s_per_kimg"] == pytest.approx(1000 / record["img_per_s"], rel=1e-2)
    assert 0 < sum(record["phase_ms"].values()) <= record["s_per_iter"] * 1000 * 1.05


def test_tiny_sampling_benchmark_compares_one_step_with_heun(capsys):
    record = bench_sample.main(["--tiny", "--precision", "bf16"])
    assert printed_json(capsys) == record
    assert (record["batch_size"], record["heun_nfe"], record["precision"]) == (16, 5, "bf16")
    assert record["speedup_vs_heun"] == pytest.approx(record["one_step_img_per_s"] / record["heun_img_per_s"],
                                                      rel=1e-2)


def test_bad_benchmark_flags_name_the_fix():
    with pytest.raises(ValueError, match="--iters and --warmup must be >= 1"):
        bench_train.main(["--tiny", "--iters", "0"])


def test_full_size_configs_are_the_official_architectures():
    shapes = full_size_shapes()
    for name, spec in bench_train.PRESETS.items():
        official = shapes[spec["official"]]
        assert spec["init_kwargs"] == official["init_kwargs"], name
        assert official["official_class"].rsplit(".", 1)[1] == spec["class_name"], name


@pytest.mark.parametrize("preset", ["cifar10", "edm2-xs"])
def test_full_size_teachers_have_the_official_parameter_count(preset):
    official = full_size_shapes()[bench_train.PRESETS[preset]["official"]]
    teacher = bench_train.build_teacher(preset)
    assert sum(p.numel() for p in teacher.parameters()) == official["num_params"]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_as_a_dry_run_and_lists_what_needs_cuda(tmp_path):
    # On a machine without a GPU every check that can run does (tiny sizes, the CPU standing in for the device); the
    # CUDA-only parts are listed, so the one device call is known to start when a GPU is lent.
    import os
    import subprocess
    import tarfile

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry_run"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_out.tar.gz", "log.txt", "speed_all.jsonl"]
    summary = json.loads((out / "gpu_check.json").read_text())["summary"]
    assert summary["dry_run"] and summary["passed"]
    assert set(summary["checks"]) == {"networks", "losses", "iteration", "compile", "fsdp", "digits", "memory"}
    assert {"networks", "memory", "compile", "digits"} <= set(summary["skipped"])
    with tarfile.open(out / "gpu_out.tar.gz") as archive:
        assert "work/digits_bf16/pipeline/model_index.json" in archive.getnames()

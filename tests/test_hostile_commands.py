"""The commands refuse hostile arguments in one line, exit code 2, before any work or any write.

Devices and pipes given as data, labels or references, seed ranges of billions, resolutions and batches far beyond
any machine, NaN lengths, outputs that cannot be written, unknown devices, teachers that cannot be downloaded, and a
folder of giant images that are small on disk: each within 1 GiB and 5 s where it reads something hostile.
"""

import os
import sys

import numpy as np
import PIL.Image
import pytest

from sida_diffusers.cli import convert, evaluate, export, ref_stats, sample, train
from sida_diffusers.cli.sample import parse_seeds

from conftest import fails_in_one_line, saved_pipeline


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /dev, /proc and /sys of Linux")
UNWRITABLE = "/sys/kernel/sida-test"  # a folder no user, root included, can create files in


@pytest.fixture
def pipeline(tmp_path):
    return saved_pipeline(tmp_path / "pipe")


# ---- devices and pipes as inputs ------------------------------------------------------------------------------------------

@linux_only
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_training_data_is_refused(tmp_path, capsys, bounded, device):
    out = tmp_path / "run"
    fails_in_one_line(capsys, train, ["--train_data", device, "--output_dir", out, "--cpu"],
                      f"training data {device} is a device, not a regular file")
    assert not out.exists()


@linux_only
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_reference_data_is_refused(tmp_path, capsys, bounded, device):
    fails_in_one_line(capsys, ref_stats, [device, tmp_path / "ref.npz", "--metrics", "fd_digits", "--device", "cpu"],
                      f"{device} is a device, not a regular file")
    assert not (tmp_path / "ref.npz").exists()


@linux_only
def test_a_device_as_class_names_is_refused(tmp_path, capsys, finished_checkpoint, bounded):
    fails_in_one_line(capsys, export, [finished_checkpoint, tmp_path / "out", "--id2label", "/dev/zero", "--no-grid",
                                       "--device", "cpu"], "/dev/zero is a device, not a regular file")
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_labels_is_refused_without_blocking(tmp_path, bounded):
    from sida_diffusers.safe_io.files import read_json

    os.mkfifo(tmp_path / "labels.json")
    with pytest.raises(ValueError, match="labels.json is a pipe, not a regular file"):
        read_json(tmp_path / "labels.json")


# ---- seeds -----------------------------------------------------------------------------------------------------------------

def test_three_hundred_million_seeds_stay_three_numbers(bounded):
    seeds = parse_seeds("0-299999999,7")
    assert len(seeds) == 300_000_001 and seeds[-1] == 7 and seeds[299_999_999] == 299_999_999
    assert seeds[10:13] == [10, 11, 12] and list(parse_seeds("3-5,1")) == [3, 4, 5, 1]


def test_seeds_beyond_32_bits_are_refused_in_one_line(pipeline, tmp_path, capsys, bounded):
    fails_in_one_line(capsys, sample, [pipeline, "--seeds", "0-999999999999", "--outdir", tmp_path / "out"],
                      "argument --seeds: seed 999999999999 is above 4294967295")
    assert not (tmp_path / "out").exists()


def test_an_npz_of_more_images_than_memory_is_refused_before_sampling(pipeline, tmp_path, capsys, bounded):
    fails_in_one_line(capsys, sample, [pipeline, "--seeds", "0-4294967295", "--npz", "--outdir", tmp_path / "out",
                                       "--device", "cpu"], "--npz keeps all 4,294,967,296 images")
    assert not (tmp_path / "out").exists()


# ---- sizes and numbers ------------------------------------------------------------------------------------------------------

def test_sida_ref_stats_refuses_a_resolution_of_100000(tmp_path, capsys):
    fails_in_one_line(capsys, ref_stats, ["digits", tmp_path / "ref.npz", "--resolution", "100000"],
                      "--resolution must be from 1 to 4,096, got 100,000")


@pytest.fixture(scope="module")
def giant_pngs(tmp_path_factory):
    """70 grey PNGs of 8192 x 8192 pixels: 4.5 MB on disk, 4.4 GiB decoded."""
    folder = tmp_path_factory.mktemp("giant")
    PIL.Image.fromarray(np.zeros((8192, 8192), np.uint8)).save(folder / "000.png")
    data = (folder / "000.png").read_bytes()
    for i in range(1, 70):
        (folder / f"{i:03d}.png").write_bytes(data)
    return folder


def test_giant_images_are_neither_cached_nor_batched_beyond_a_gibibyte(giant_pngs, tmp_path, capsys, bounded):
    fails_in_one_line(capsys, ref_stats, [giant_pngs, tmp_path / "ref.npz", "--metrics", "fd_digits", "--device", "cpu"],
                      "a batch of 64 decoded [1, 8192, 8192] images takes 4,096 MiB (at most 1024 MiB); pass "
                      "--batch-size 16 or less, or --resolution")


@pytest.mark.parametrize("flag, value, problem", [
    ("--train_batch_size", str(10 ** 12), "--train_batch_size must be an integer from 1 to 65,536"),
    ("--max_train_kimg", "nan", "--max_train_kimg must be a finite number > 0"),
    ("--ema_halflife_kimg", "nan", "--ema_halflife_kimg must be a finite number > 0"),
    ("--lr", "inf", "--lr must be a finite number >= 0 and <= 10"),
    ("--init_sigma", "-1", "--init_sigma must be a finite number > 0"),
    ("--augment_p", "2", "--augment_p must be a finite number >= 0 and <= 1"),
    ("--sample_grid_size", "100000", "--sample_grid_size must be an integer from 0 to 64"),
    ("--total_batch_size", str(10 ** 9), "--total_batch_size must be an integer from 1 to 16,777,216"),
    ("--seed", "-3", "--seed must be an integer from 0"),
])
def test_train_flags_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, problem):
    out = tmp_path / "run"
    fails_in_one_line(capsys, train, [flag, value, "--output_dir", out, "--cpu"], problem)
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:digits")  # the 2 KiB machine also reads the digits on demand
def test_a_micro_batch_beyond_the_machine_is_refused_once_the_teacher_is_known(tmp_path, capsys, monkeypatch):
    import sida_diffusers.data.datasets as datasets

    monkeypatch.setattr(datasets, "cache_budget", lambda: 1 << 10)  # a machine of 2 KiB
    fails_in_one_line(capsys, train, ["--train_batch_size", "64", "--output_dir", tmp_path / "run", "--cpu"],
                      "--train_batch_size 64 makes one micro-batch", "more than 1/16")


@pytest.mark.parametrize("argv, problem", [
    (["--workers", "-1"], "--workers must be from 0 to 256, got -1"),
    (["--batch-size", str(10 ** 9)], "--batch-size must be from 1 to 65,536"),
])
def test_sida_ref_stats_refuses_bad_numbers_in_one_line(tmp_path, capsys, argv, problem):
    fails_in_one_line(capsys, ref_stats, ["digits", tmp_path / "ref.npz", *argv], problem)


# ---- outputs -----------------------------------------------------------------------------------------------------------------

@linux_only
def test_outputs_that_cannot_be_written_are_refused_before_the_work(pipeline, tmp_path, capsys):
    problem = "nothing can be created in /sys/kernel"
    fails_in_one_line(capsys, evaluate, [pipeline, "--out", f"{UNWRITABLE}/r.json", "--metrics", "fd_digits"], problem)
    fails_in_one_line(capsys, sample, [pipeline, "--grid", f"{UNWRITABLE}/grid.png"], problem)
    fails_in_one_line(capsys, sample, [pipeline, "--outdir", UNWRITABLE], problem)
    fails_in_one_line(capsys, ref_stats, ["digits", f"{UNWRITABLE}/ref.npz"], problem)
    fails_in_one_line(capsys, train, ["--output_dir", UNWRITABLE, "--cpu"], "--output_dir", problem)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("precious")
    fails_in_one_line(capsys, train, ["--output_dir", tmp_path / "taken", "--cpu"],
                      f"--output_dir {tmp_path / 'taken'} cannot be a folder: {tmp_path / 'taken'} is an existing file")
    assert (tmp_path / "taken").read_text() == "precious"


@pytest.mark.parametrize("command", [export, convert])
def test_a_destination_name_longer_than_the_file_system_takes_is_refused(tmp_path, capsys, command):
    fails_in_one_line(capsys, command, ["digits", tmp_path / ("x" * 300)], "is 300 bytes, more than the 255")


# ---- devices ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, argv", [
    (sample, ["{pipe}", "--grid", "{tmp}/g.png"]),
    (evaluate, ["{pipe}", "--metrics", "fd_digits"]),
    (ref_stats, ["digits", "{tmp}/ref.npz"]),
    (export, ["digits", "{tmp}/out"]),
])
@pytest.mark.parametrize("device, problem", [("bogus", "'bogus' is not a device"),
                                             ("cuda:7", "this machine has no such device")])
def test_devices_the_machine_does_not_have_are_refused(pipeline, tmp_path, capsys, command, argv, device, problem):
    if device.startswith("cuda") and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = [a.format(pipe=pipeline, tmp=tmp_path) for a in argv]
    fails_in_one_line(capsys, command, [*argv, "--device", device], "--device", problem)


# ---- a teacher that cannot be fetched ------------------------------------------------------------------------------------

def test_a_teacher_that_cannot_be_downloaded_is_one_line_from_the_trainer(tmp_path, capsys, monkeypatch):
    import sida_diffusers.pretrained as pretrained

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(pretrained, "snapshot_download", offline)
    fails_in_one_line(capsys, train, ["--teacher", "someone/missing-teacher", "--method", "sid", "--output_dir",
                                      tmp_path / "run", "--cpu"],
                      "could not fetch 'someone/missing-teacher' from the Hugging Face Hub (ConnectionError: no network)")
    assert not (tmp_path / "run").exists()


# ---- the Inception file ---------------------------------------------------------------------------------------------------

@pytest.fixture
def cached_inception(tmp_path, monkeypatch):
    """A stand-in inception-2015-12-05.pt already in our download cache (nothing is downloaded)."""
    monkeypatch.setenv("SIDA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / "nvlabs-fi-cdn.nvidia.com" / "inception-2015-12-05.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in")
    return path


def test_the_default_inception_file_comes_from_our_cache_never_from_tmp(cached_inception):
    from sida_diffusers.evaluation import resolve_inception_path

    assert resolve_inception_path() == cached_inception


def test_an_inception_file_others_can_replace_is_not_loaded(cached_inception):
    from sida_diffusers.evaluation import resolve_inception_path

    cached_inception.parent.chmod(0o777)
    with pytest.raises(ValueError, match="nvidia.com is writable by every user .*`chmod o-w"):
        resolve_inception_path()
    cached_inception.parent.chmod(0o755)
    cached_inception.chmod(0o666)
    with pytest.raises(ValueError, match="inception-2015-12-05.pt is writable by every user"):
        resolve_inception_path()

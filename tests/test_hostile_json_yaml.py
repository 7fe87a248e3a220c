"""Structured text from elsewhere (JSON configs, labels and records, a card's YAML, .npz references) is bounded in what
it may expand to, not only in bytes: values and nesting are counted before anything is built.

Each case is a few kilobytes to a few hundred megabytes of text that would become gigabytes of Python objects, run
within 1 GiB and 5 s (the `bounded` fixture); each is refused with one ValueError naming the file.
"""

import io
import json
import zipfile

import numpy as np
import pytest

from sida_diffusers.cli import sample
from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.evaluation import load_reference
from sida_diffusers.pipelines import SiDAPipeline
from sida_diffusers.pretrained import load_denoiser
from sida_diffusers.safe_io.files import parse_yaml, read_json

from conftest import fails_in_one_line, grey_png, refused_file, saved_pipeline, tiny_edm


EMPTY_OBJECTS = 250 << 20  # the reported dataset.json: 250 MiB of {}, about 250 kB deflated


def empty_objects(size: int) -> bytes:
    return b"[" + b"{}," * (size // 3 - 1) + b"{}]"


@pytest.fixture(scope="module")
def amplified_zip(tmp_path_factory):
    """An EDM dataset zip of two images whose dataset.json inflates to 250 MiB of empty objects."""
    path = tmp_path_factory.mktemp("amplified") / "data.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", grey_png())
        archive.writestr("b.png", grey_png())
        with archive.open("dataset.json", "w") as f:
            chunk = b"{}," * (1 << 20)
            f.write(b"[")
            for _ in range(EMPTY_OBJECTS // len(chunk)):
                f.write(chunk)
            f.write(b"{}]")
    return path


def test_a_dataset_json_inflating_to_250_mib_of_empty_objects_is_refused_by_counting(amplified_zip, bounded):
    assert amplified_zip.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=r"data.zip/dataset.json holds at least 87,031,808 JSON values, more than "
                                         r"the 8,388,608"):
        build_dataset(amplified_zip)


def test_a_json_value_count_ignores_commas_inside_strings(bounded):
    names = json.dumps({"labels": [[f"a,b:{i}.png", i % 10] for i in range(10)]}).encode()
    assert read_json(names, max_nodes=40)["labels"][3] == ["a,b:3.png", 3]  # 32 values, 52 commas and colons


def test_json_nested_past_64_levels_is_refused_before_parsing(bounded):
    with pytest.raises(ValueError, match="nests its JSON too deeply"):
        read_json(b"[" * 65 + b"]" * 65)
    assert read_json(b'["[[[[", ' + b"[" * 62 + b"]" * 62 + b"]")[0] == "[[[["  # brackets in strings do not count


def test_a_teacher_config_json_of_empty_objects_is_refused_in_one_line(tmp_path, capsys, bounded):
    from sida_diffusers.cli import convert

    tiny_edm().save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "config.json").write_bytes(empty_objects(63 << 20))
    fails_in_one_line(capsys, convert, [tmp_path / "teacher", tmp_path / "out"], "config.json is 66,060,",
                      "more than the 1,048,576")
    refused_file(load_denoiser, tmp_path / "teacher", "more than the 1,048,576")


@pytest.mark.parametrize("name", ["model_index.json", "run_info.json"])
def test_a_pipeline_record_of_empty_objects_is_refused(tmp_path, capsys, bounded, name):
    folder = saved_pipeline(tmp_path / "pipe")
    (folder / name).write_bytes(empty_objects(63 << 20))
    fails_in_one_line(capsys, sample, [folder, "--grid", tmp_path / "grid.png", "--device", "cpu"], name,
                      "more than the 1,048,576")
    assert not (tmp_path / "grid.png").exists()


# ---- a model card's YAML -------------------------------------------------------------------------------------------------

def alias_bomb(levels=7, width=7000):
    """model-index results repeated width**2 times through aliases, in about 56 kB."""
    lines = ["model-index:", "- name: bomb", "  results:", "  - &r0 {task: {type: x}}"]
    lines += [f"  - &r{i} [{', '.join(['*r' + str(i - 1)] * 10)}]" for i in range(1, levels)]
    lines += [f"  - [{', '.join(['*r' + str(levels - 1)] * (width // 10))}]"]
    return "\n".join(lines)


@pytest.mark.parametrize("front_matter, problem", [
    (alias_bomb(), "its YAML uses an alias (*r0)"),
    ("tags: " + "[" * 100 + "]" * 100, "its YAML nests more than 64 levels deep"),
    ("tags: " + "[" * 20_000 + "]" * 20_000, "its YAML"),  # libyaml stops at 1000 levels, the pure parser at 65
    ("tags: [a, b\nlicense: mit", "its YAML cannot be parsed"),
    ("x: !!python/object/apply:os.system ['touch MARKER']", "its YAML uses the tag"),
    ("- just\n- a list", "its metadata is not a model card's"),
])
def test_a_model_card_whose_yaml_is_a_bomb_or_broken_is_refused_naming_the_file(tmp_path, bounded, front_matter,
                                                                               problem):
    folder = saved_pipeline(tmp_path / "pipe")
    marker = tmp_path / "MARKER"
    (folder / "README.md").write_text(f"---\n{front_matter.replace('MARKER', str(marker))}\n---\n# card\n")
    refused_file(SiDAPipeline.from_pretrained, folder, problem, "README.md", "fix or delete the model card")
    assert not marker.exists()


def test_yaml_values_are_counted_before_they_are_built(bounded):
    with pytest.raises(ValueError, match="holds more than 100,000 values"):
        parse_yaml("[" + ", ".join(["1"] * 100_001) + "]", "card")
    assert parse_yaml("license: mit\ntags: [a, b]", "card") == {"license": "mit", "tags": ["a", "b"]}


def test_an_honest_card_with_model_index_metrics_still_loads(tmp_path):
    folder = saved_pipeline(tmp_path / "pipe")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nmodel-index:\n- name: m\n  results:\n  - task: "
                                      "{type: unconditional-image-generation}\n    dataset: {name: digits, type: "
                                      "digits}\n    metrics:\n    - {type: fid, value: 1.5}\n---\n# card\n")
    pipe = SiDAPipeline.from_pretrained(folder)
    assert pipe.model_card.data.license == "apache-2.0" and pipe.model_card.data.eval_results[0].metric_value == 1.5


# ---- arrays ----------------------------------------------------------------------------------------------------------------

def npy_header(descr: str, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("descr", ["|V0", "|V20000000", "<U0"])
def test_an_npz_reference_of_void_or_empty_dtype_declaring_1e10_elements_is_refused(tmp_path, bounded, descr):
    path = tmp_path / "ref.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mu.npy", npy_header("<f8", (4,)) + np.zeros(4).tobytes())
        archive.writestr("sigma.npy", npy_header(descr, (100_000, 100_000)))
    refused_file(load_reference, path, "sigma.npy", "holds an array of dtype")


def test_a_reference_whose_sigma_is_not_a_square_matrix_is_refused(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.zeros((4, 3)))
    refused_file(load_reference, tmp_path / "ref.npz", "sigma [D, D]")


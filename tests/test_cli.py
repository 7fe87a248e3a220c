"""One spelling style for every sida-* command: each long flag works as --flag-name and as --flag_name."""

import numpy as np
import PIL.Image
import pytest
import torch

from sida_diffusers.cli import SPELLING_NOTE, convert, evaluate, export, ref_stats, sample
from sida_diffusers.pipelines import SiDAPipeline

from conftest import tiny_edm


COMMANDS = {"sida-convert": convert, "sida-export": export, "sida-sample": sample, "sida-eval": evaluate,
            "sida-ref-stats": ref_stats}


def twin(flag):
    """--batch-size <-> --batch_size"""
    body = flag[2:]
    return "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_long_flag_has_its_hyphen_and_underscore_spelling(command):
    parser = COMMANDS[command].build_parser()
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    for flag in flags:
        assert parser._option_string_actions[twin(flag)] is parser._option_string_actions[flag], flag
    help_text = parser.format_help()
    assert " ".join(SPELLING_NOTE.split()) in " ".join(help_text.split())  # said once, in --help


@pytest.mark.parametrize("command, argv", [
    ("sida-sample", ["pipe", "--outdir", "out", "--batch-size", "3", "--class-labels", "1", "2"]),
    ("sida-eval", ["pipe", "--num-samples", "10", "--seeds-start", "5", "--inception-mode", "clean"]),
    ("sida-export", ["src", "dst", "--push-to-hub", "me/x", "--no-grid"]),
    ("sida-convert", ["src", "dst", "--cache-dir", "cache"]),
    ("sida-ref-stats", ["data", "out.npz", "--max-images", "7", "--batch-size", "2"]),
])
def test_underscore_and_hyphen_spellings_parse_to_the_same_arguments(command, argv):
    parser = COMMANDS[command].build_parser()
    underscored = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv]
    assert underscored != argv
    assert vars(parser.parse_args(underscored)) == vars(parser.parse_args(argv))


def test_an_abbreviated_flag_still_works_with_two_spellings():
    assert sample.build_parser().parse_args(["pipe", "--grid", "g.png", "--batch", "5"]).batch_size == 5


def test_sida_sample_with_diffusers_style_flags(tmp_path):
    pipe = SiDAPipeline(unet=tiny_edm(label_dim=3))
    pipe.save_pretrained(tmp_path / "pipe")
    assert sample.main([str(tmp_path / "pipe"), "--seeds", "0-1", "--outdir", str(tmp_path / "out"),
                        "--batch_size", "1", "--class_labels", "2", "--device", "cpu"]) == 0
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=1, class_labels=2, generator=torch.Generator().manual_seed(1), output_type="pil")
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / "000001.png")),
                                  np.asarray(expected.images[0]))

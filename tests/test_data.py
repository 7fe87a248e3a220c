import json
import zipfile

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from sida_diffusers.data.datasets import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, build_dataset, encode_latents
from sida_diffusers.digits import load_digits_dataset
from sida_diffusers.networks import one_hot
from sida_diffusers.training.batches import InfiniteBatchStream

from conftest import write_latents


@pytest.fixture(scope="module")
def digits_hf():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def digits(digits_hf):
    return build_dataset(digits_hf)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def rgb(value, size=8):
    return np.full((size, size, 3), value, dtype=np.uint8)


# ---- sources ---------------------------------------------------------------------------------------------------------

def test_digits_are_1797_grey_16x16_images_of_10_classes(digits):
    assert len(digits) == 1797 and digits.resolution == 16 and digits.num_channels == 1
    assert digits.label_dim == 10 and digits.has_labels and not digits.is_latent
    assert digits.id2label == {i: str(i) for i in range(10)}
    image, label = digits[0]
    assert image.shape == (1, 16, 16) and image.dtype == np.uint8 and label == 0
    assert image.max() > 200 and image.min() == 0  # 0..16 is stretched to 0..255
    assert np.bincount(digits.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_source_is_deterministic_and_goes_through_the_hf_path(digits):
    again = build_dataset("digits")
    assert np.array_equal(again.get_batch(np.arange(1797))[0], digits.get_batch(np.arange(1797))[0])
    assert np.array_equal(again.labels, digits.labels)
    assert build_dataset("digits", resolution=8, max_size=50).item_shape == (1, 8, 8)


def test_saved_hf_dataset_with_guessed_and_explicit_columns(digits_hf, tmp_path):
    subset = digits_hf.select(range(60))
    subset.save_to_disk(str(tmp_path / "guessed"))
    guessed = build_dataset(str(tmp_path / "guessed"))
    assert len(guessed) == 60 and guessed.label_dim == 10 and guessed.id2label[3] == "3"
    assert np.array_equal(guessed.labels, np.asarray(digits_hf["label"][:60]))

    renamed = subset.rename_columns({"image": "img", "label": "target"}).cast_column("target", datasets.Value("int64"))
    renamed.save_to_disk(str(tmp_path / "explicit"))
    assert build_dataset(str(tmp_path / "explicit")).label_dim == 0  # no ClassLabel to guess: unconditional
    explicit = build_dataset(str(tmp_path / "explicit"), image_column="img", label_column="target")
    assert explicit.label_dim == int(np.max(digits_hf["label"][:60])) + 1 and explicit.id2label is None
    assert np.array_equal(explicit[5][0], guessed[5][0])
    with pytest.raises(ValueError, match="columns are"):  # the image column was renamed
        build_dataset(str(tmp_path / "explicit"), image_column="image")
    with pytest.raises(ValueError, match="not an Image feature"):
        build_dataset(str(tmp_path / "explicit"), image_column="target")


def test_saved_dataset_dict_picks_the_split_after_a_colon(digits_hf, tmp_path):
    splits = datasets.DatasetDict(train=digits_hf.select(range(30)), test=digits_hf.select(range(30, 40)))
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(build_dataset(str(tmp_path / "dict"))) == 30  # train by default
    assert len(build_dataset(f"{tmp_path / 'dict'}:test")) == 10
    with pytest.raises(ValueError, match="holds the splits"):
        build_dataset(f"{tmp_path / 'dict'}:validation")


def test_image_folder_takes_labels_from_dataset_json(tmp_path):
    for i in range(6):
        write_png(tmp_path / "sub" / f"{i}.png", rgb(40 * i))
    labels = [["sub/%d.png" % i, i % 3] for i in range(6)]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    ds = build_dataset(tmp_path)
    assert ds.item_shape == (3, 8, 8) and ds.label_dim == 3 and ds.id2label is None
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds[4][0][0, 0, 0] == 160
    assert build_dataset(tmp_path, use_labels=False).label_dim == 0
    assert build_dataset(tmp_path, resolution=4)[0][0].shape == (3, 4, 4)


def test_image_folder_takes_labels_from_class_subfolders(tmp_path):
    for name, value in [("cat", 10), ("cat", 20), ("dog", 30)]:
        write_png(tmp_path / name / f"{value}.png", rgb(value)[..., 0])  # grey stays one channel
    ds = build_dataset(str(tmp_path))
    assert ds.item_shape == (1, 8, 8) and ds.id2label == {0: "cat", 1: "dog"} and ds.labels.tolist() == [0, 0, 1]


def test_edm_dataset_tool_zip(tmp_path):
    path = tmp_path / "tiny-8x8.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(5):
            image = PIL.Image.fromarray(rgb(50 * i))
            with z.open(f"00000/img{i:08d}.png", "w") as f:
                image.save(f, format="png")
        z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", 4 - i] for i in range(5)]}))
    ds = build_dataset(str(path))
    assert len(ds) == 5 and ds.label_dim == 5 and ds.labels.tolist() == [4, 3, 2, 1, 0]
    assert ds[2][0].shape == (3, 8, 8) and ds[2][0].max() == 100


def test_edm2_latent_folder_and_zip(tmp_path):
    rng = np.random.default_rng(0)
    moments = rng.normal(size=(6, 8, 4, 4)).astype(np.float32)
    moments[:, 4:] = np.abs(moments[:, 4:])
    write_latents(tmp_path / "latents", moments, labels=[0, 1, 2, 0, 1, 2])
    with zipfile.ZipFile(tmp_path / "img4-sd.zip", "w") as z:
        for f in sorted((tmp_path / "latents").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path / "latents").as_posix())
    for source in (tmp_path / "latents", tmp_path / "img4-sd.zip"):
        ds = build_dataset(source)
        assert ds.is_latent and ds.num_channels == 4 and ds.resolution == 4 and ds.label_dim == 3
        item, label = ds[3]
        assert item.dtype == np.float32 and np.array_equal(item, moments[3]) and label == 0


def test_encode_latents_samples_mean_plus_std_noise_then_normalises():
    assert torch.allclose(EDM2_LATENT_SCALE, torch.tensor([0.119904, 0.108225, 0.134771, 0.152439]), atol=1e-6)
    assert torch.allclose(EDM2_LATENT_BIAS, torch.tensor([-0.696643, -0.351732, -0.016173, 0.327744]), atol=1e-6)
    mean, std = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, 2.0, 0.1])
    moments = torch.cat([mean, std]).view(1, 8, 1, 1).expand(20000, 8, 2, 2)
    x = encode_latents(moments, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 4, 2, 2)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), mean * EDM2_LATENT_SCALE + EDM2_LATENT_BIAS, atol=0.01)
    assert torch.allclose(x.std(dim=(0, 2, 3)), std * EDM2_LATENT_SCALE, rtol=0.03)
    assert not torch.equal(x, encode_latents(moments, torch.Generator().manual_seed(1)))  # stochastic on every use


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "missing.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset(tmp_path / "empty")
    write_png(tmp_path / "mixed" / "a.png", rgb(0))
    write_png(tmp_path / "mixed" / "b.png", rgb(0, size=6))
    with pytest.raises(ValueError, match="every item must share one shape"):
        build_dataset(tmp_path / "mixed")
    write_png(tmp_path / "broken" / "a.png", rgb(0))
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read the image"):
        build_dataset(tmp_path / "broken")
    write_latents(tmp_path / "lat", np.ones((2, 8, 4, 4), np.float32), labels=[0, 1])
    with pytest.raises(ValueError, match="latents cannot be resized"):
        build_dataset(tmp_path / "lat", resolution=8)


# ---- batches ---------------------------------------------------------------------------------------------------------

def test_one_hot_labels():
    assert one_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    assert one_hot(torch.tensor([-1, -1]), 0).shape == (2, 0)
    with pytest.raises(ValueError, match="use_labels=False"):
        one_hot(torch.tensor([3]), 3)


def test_stream_yields_scaled_pixels_and_one_hot_labels(digits):
    x, c = next(InfiniteBatchStream(digits, batch_size=8, seed=1))
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32 and x.min() == -1 and x.max() <= 1
    assert c.shape == (8, 10) and torch.equal(c.sum(1), torch.ones(8))
    images, labels = digits.get_batch(InfiniteBatchStream(digits, batch_size=8, seed=1).indices())
    assert torch.equal(x, torch.from_numpy(images).float() / 127.5 - 1)
    assert torch.equal(c.argmax(1), torch.from_numpy(labels))


def test_ranks_are_disjoint_within_an_epoch_and_the_seed_fixes_the_order(digits):
    seen = [np.concatenate([InfiniteBatchStream(digits, 50, rank, 3, seed=4).indices(p) for p in range(0, 1650, 150)])
            for rank in range(3)]
    everything = np.concatenate(seen)
    assert len(everything) == 1650 and len(np.unique(everything)) == 1650
    assert np.array_equal(InfiniteBatchStream(digits, 50, 1, 3, seed=4).indices(),
                          InfiniteBatchStream(digits, 50, 1, 3, seed=4).indices())
    assert not np.array_equal(InfiniteBatchStream(digits, 50, seed=4).indices(),
                              InfiniteBatchStream(digits, 50, seed=5).indices())


def test_epochs_wrap_around_without_dropping_items(digits):
    small = build_dataset(load_digits_dataset().select(range(10)))
    stream = InfiniteBatchStream(small, batch_size=4, seed=0)
    order = np.concatenate([stream.indices(p) for p in range(0, 40, 4)])
    assert all(sorted(order[i:i + 10]) == list(range(10)) for i in range(0, 40, 10))
    assert not np.array_equal(order[:10], order[10:20])  # a new permutation per epoch


def test_resume_from_state_dict_replays_the_same_batches(digits):
    stream = InfiniteBatchStream(digits, batch_size=16, rank=1, world_size=2, seed=9)
    for _ in range(120):  # past the first epoch boundary (1797 / 32 batches)
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = InfiniteBatchStream(digits, batch_size=16, rank=1, world_size=2, seed=0)
    resumed.load_state_dict(state)
    assert state["position"] == 120 * 32
    for (x, c), (rx, rc) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(c, rc)


def test_latent_stream_redraws_noise_per_batch_but_replays_it_on_resume(tmp_path):
    moments = np.concatenate([np.zeros((4, 4, 2, 2)), np.ones((4, 4, 2, 2))], axis=1).astype(np.float32)
    write_latents(tmp_path, moments, labels=[0, 1, 0, 1])
    ds = build_dataset(tmp_path, use_labels=False)
    stream = InfiniteBatchStream(ds, batch_size=4, seed=2)
    first, c = next(stream)
    state = stream.state_dict()
    second, _ = next(stream)
    assert first.shape == (4, 4, 2, 2) and c.shape == (4, 0) and not torch.equal(first, second)
    resumed = InfiniteBatchStream(ds, batch_size=4, seed=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], second)

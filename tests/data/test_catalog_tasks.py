"""Catalog tasks through their real pipelines under `tfds.testing.mock_data` (no network)."""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparseformer.data import get_task
from sparseformer.data.catalog import DatasetNotPreparedError, grayscale_tokens, text_bytes

BATCH = 4


def _config(name: str, data_dir, **overrides) -> ml_collections.ConfigDict:
    data = get_task(name).default_data_config("tiny")
    data.data_dir = str(data_dir)
    data.update(overrides)
    return ml_collections.ConfigDict(dict(task=name, scale="tiny", batch_size=BATCH, data=data))


@pytest.mark.parametrize("name", ["text", "image", "lm1b", "translate"])
def test_catalog_task_through_its_pipeline_on_mock_data(name, tmp_path):
    task = get_task(name)
    config = _config(name, tmp_path)
    with tfds.testing.mock_data(num_examples=10):
        train = task.pipeline(config, "train", seed=0)
        batch = next(train)
        state = train.get_state()
        after = next(train)
        resumed = task.pipeline(config, "train", seed=0)
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["inputs"], after["inputs"])
        evals = list(task.pipeline(config, "validation", seed=0))
    assert len(evals) == 3 and sum(int(b["example_mask"].sum()) for b in evals) == 10
    L = config.data.max_len
    assert batch["inputs"].shape == (BATCH, L) and batch["inputs"].dtype == np.int32
    assert batch["inputs"].max() < task.vocab_size and batch["example_mask"].all()
    if task.kind == "classifier":
        assert batch["labels"].max() < task.num_classes
        assert batch["inputs_mask"].any(1).all()
    if task.kind == "lm":
        assert (batch["inputs"][:, 0] == task.bos_id).all()
        shifted = batch["inputs"][:, 1:] != 0  # the next token is an input too (all but the final EOS)
        np.testing.assert_array_equal(batch["targets"][:, :-1][shifted], batch["inputs"][:, 1:][shifted])
        n = batch["targets_mask"].sum(1) - 1
        assert (batch["targets"][np.arange(BATCH), n] == task.eos_id).all()
    if task.kind == "seq2seq":
        assert batch["targets"].shape == (BATCH, config.data.max_target_len)
        n = batch["targets_mask"].sum(1) - 1
        assert (batch["targets"][np.arange(BATCH), n] == task.eos_id).all()
        assert isinstance(task.decode(batch["targets"][0]), str)


def test_text_is_bytes_and_image_is_grayscale():
    ids = text_bytes("héllo")
    assert ids.tolist() == [b + 3 for b in "héllo".encode()]
    assert get_task("text").decode(np.append(ids, [2, 0, 0])) == "héllo"
    img = np.zeros((32, 32, 3), np.uint8)
    img[0, 0] = (255, 255, 255)
    img[0, 1] = (255, 0, 0)
    tokens = grayscale_tokens(img)
    assert tokens.shape == (1024,) and tokens[0] == 255 + 3 and tokens[1] == round(0.2989 * 255) + 3 and tokens[2] == 3


def test_translate_trains_and_caches_its_sentencepiece_model(tmp_path):
    task = get_task("translate")
    config = _config("translate", tmp_path, spm_vocab_size=60)
    with tfds.testing.mock_data(num_examples=30):
        batch = next(task.pipeline(config, "train", seed=0))
    models = os.listdir(tmp_path / "sparseformer_spm")
    assert len(models) == 1 and models[0].endswith(".model")
    sp = task.tokenizer(config)  # cached: loads, does not retrain
    assert sp.pad_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
    text = "abc def"
    assert task.decode(sp.encode(text) + [2, 0]) == text
    n = int(batch["inputs_mask"][0].sum())
    assert sp.decode(batch["inputs"][0][:n].tolist())  # the source decodes to text


@pytest.mark.parametrize("name,dataset", [("text", "imdb_reviews"), ("image", "cifar10"), ("lm1b", "lm1b"), ("translate", "wmt14_translate/de-en")])
def test_unprepared_dataset_says_how_to_prepare_it_without_downloading(name, dataset, tmp_path):
    task = get_task(name)
    config = _config(name, tmp_path)
    start = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as info:
        task.pipeline(config, "train", seed=0)
    assert time.perf_counter() - start < 10  # nothing hangs on a download
    message = str(info.value)
    assert f"tfds.builder('{dataset}', data_dir='{tmp_path}', file_format='array_record').download_and_prepare()" in message
    assert "pip install 'sparseformer[tf]'" in message
    assert not task.is_prepared(config)
    assert not any("downloads" in p and os.listdir(os.path.join(tmp_path, p)) for p in os.listdir(tmp_path))

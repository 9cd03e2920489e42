"""Long Range Arena release files, written here in the release formats, read through the registry."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from sparseformer.data import get_task, listops


def _config(name: str, lra_dir, batch_size: int = 4) -> ml_collections.ConfigDict:
    data = get_task(name).default_data_config("tiny")
    data.lra_dir = str(lra_dir)
    return ml_collections.ConfigDict(dict(task=name, scale="tiny", batch_size=batch_size, data=data))


def _all(it):
    return [b for b in it]


def test_lra_listops_tsv(tmp_path):
    examples = listops.generate(30, seed=0, min_length=8, max_length=100)
    for split, rows in [("train", examples[:20]), ("val", examples[20:25]), ("test", examples[25:])]:
        lines = ["Source\tTarget"] + [f"{text}\t{label}" for text, label in rows]
        (tmp_path / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    task = get_task("lra_listops")
    config = _config("lra_listops", tmp_path)
    assert task.is_prepared(config)
    batches = _all(task.pipeline(config, "validation", seed=0))
    assert len(batches) == 2 and int(sum(b["example_mask"].sum() for b in batches)) == 5
    got = [(task.decode(b["inputs"][i]), int(b["labels"][i])) for b in batches for i in np.flatnonzero(b["example_mask"])]
    want = [(t.replace("( ", "").replace(" )", ""), y) for t, y in examples[20:25]]
    assert got == want
    assert next(task.pipeline(config, "train", seed=0))["inputs"].shape == (4, 2048)


def test_lra_retrieval_tsv_is_a_dual_encoder_task(tmp_path):
    rows = [("1.0", "a1", "b1", "first doc", "second doc"), ("0.0", "a2", "b2", "x" * 300, "y")]
    for name in ("train", "eval", "test"):
        (tmp_path / f"new_aan_pairs.{name}.tsv").write_text("\n".join("\t".join(r) for r in rows * 3) + "\n")
    task = get_task("lra_retrieval")
    assert task.kind == "dual_encoder"
    batch = next(task.pipeline(_config("lra_retrieval", tmp_path), "test", seed=0))
    assert set(batch) == {"inputs1", "inputs1_mask", "inputs2", "inputs2_mask", "labels", "example_mask"}
    assert batch["labels"].tolist() == [1, 0, 1, 0]
    assert task.decode(batch["inputs1"][0]) == "first doc" and task.decode(batch["inputs2"][0]) == "second doc"
    assert batch["inputs1_mask"][1].sum() == 256  # cut at max_len bytes


def test_lra_pathfinder_images(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pathfinder needs Pillow to decode PNG images")
    rng = np.random.default_rng(0)
    (tmp_path / "metadata").mkdir()
    pixels = {}
    for m in range(2):
        (tmp_path / "imgs" / str(m)).mkdir(parents=True)
        lines = []
        for i in range(10):
            img = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / str(m) / f"sample_{i}.png")
            label = (m * 10 + i) % 2
            pixels[(m, i)] = (img, label)
            lines.append(f"imgs/{m} sample_{i}.png 0 {label} 0.5 6 2")
        (tmp_path / "metadata" / f"{m}.npy").write_text("\n".join(lines) + "\n")
    task = get_task("lra_pathfinder")
    config = _config("lra_pathfinder", tmp_path, batch_size=2)
    sizes = {s: int(sum(b["example_mask"].sum() for b in task.pipeline(config, s, seed=0))) for s in ("validation", "test")}
    assert sizes == {"validation": 2, "test": 2}  # 80/10/10 of 20
    first = next(task.pipeline(config, "validation", seed=0))  # metadata order: 0.npy then 1.npy
    img, label = pixels[(1, 6)]
    np.testing.assert_array_equal(first["inputs"][0], img.reshape(-1).astype(np.int32) + 3)
    assert first["labels"][0] == label and first["inputs_mask"].all()


def test_missing_lra_dir_says_which_files(tmp_path):
    task = get_task("lra_listops")
    with pytest.raises(FileNotFoundError, match="config.data.lra_dir.*basic_train.tsv"):
        task.pipeline(_config("lra_listops", ""), "train", seed=0)
    with pytest.raises(FileNotFoundError, match="basic_val.tsv is missing"):
        task.pipeline(_config("lra_listops", tmp_path), "validation", seed=0)

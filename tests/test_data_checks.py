"""Data that used to fail late or silently: over-long samples (measured before training, data.on_too_long),
images under keys / columns the reader did not use, VLM runs without images, malformed rows."""
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from harness.collator import ChatCollator
from harness.data import Splits, build_datasets
from harness.data.lengths import check_data
from harness.errors import DataError
from harness.processors import build_local_processor
from harness.registry import get_architecture


@pytest.fixture(scope="module")
def processor():
    return build_local_processor(get_architecture("qwen2_vl"), 56 * 56, 56 * 56)


def image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def image_rows(tmp_path, n, long_at=None):
    """n jsonl rows with an image each; row `long_at` has a prompt of a few hundred tokens."""
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image(i).save(tmp_path / "img" / f"{i}.png")
        prompt = "word " * 300 if i == long_at else "What?"
        rows.append({"image": f"img/{i}.png", "prompt": prompt, "answer": str(i % 10)})
    return rows


def test_measure_is_the_training_batch_length(processor):
    c = ChatCollator(processor)
    samples = [{"images": [image(0)], "prompt": "What?", "answer": "7"},
               {"images": [], "prompt": "a much longer prompt than the first one", "answer": "12"}]
    lengths = c.measure(samples)
    assert lengths == c(samples)["attention_mask"].sum(1).tolist() and lengths[0] != lengths[1]


def test_too_long_sample_is_skipped_counted_and_named(compose, processor, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", image_rows(tmp_path, 10, long_at=3))
    _, run = compose(["logger=none", "data=jsonl", f"data.path={path}", "data.max_length=128"])
    splits = check_data(build_datasets(run.data, run.seed), ChatCollator(processor, max_length=128), run.data)
    assert len(splits.train) + len(splits.eval) == 9 and splits.stats["skipped"] == 1
    assert splits.stats["too_long"] == 1
    assert splits.stats["reasons"][0].startswith(f"{path}:4: ") and "more than data.max_length=128" in \
        splits.stats["reasons"][0]
    assert splits.stats["train_with_images"] == len(splits.train) and splits.stats["train_without_images"] == 0


def test_too_long_error_mode_names_sample_length_and_fixes(compose, processor, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", image_rows(tmp_path, 6, long_at=2))
    _, run = compose(["logger=none", "data=jsonl", f"data.path={path}", "data.max_length=128",
                      "data.on_too_long=error"])
    with pytest.raises(DataError, match=r"d\.jsonl:3 has \d+ tokens, more than data.max_length=128; fix: raise "
                                        r"data.max_length, lower model.max_pixels .*data.on_too_long=skip"):
        check_data(build_datasets(run.data, run.seed), ChatCollator(processor, max_length=128), run.data)


def test_too_long_sample_no_longer_stops_training(compose, tmp_path):
    """The run trains past it (it died at the step whose batch held it) and metrics.json counts it."""
    from harness.pipeline import train_run

    path = write_rows(tmp_path / "d.jsonl", image_rows(tmp_path, 12))
    _, run = compose(["logger=none", "device=cpu", "data=jsonl", f"data.path={path}", "data.max_length=128",
                      "data.eval_fraction=0.2", "train.max_steps=3", "train.per_device_train_batch_size=4",
                      "train.warmup_steps=0", "save.adapter=false"])
    # the split depends on the row count and seed only: make a row that lands in train the long one
    line = int(build_datasets(run.data, run.seed).train[0]["source"].rsplit(":", 1)[1])
    write_rows(path, image_rows(tmp_path, 12, long_at=line - 1))
    m = train_run(run, {}, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data_skipped"] == saved["data_skipped"] == 1 and saved["status"] == "ok"
    assert saved["data_skip_reasons"][0].startswith(f"{path}:{line}: ")


def test_config_validates_on_too_long(compose):
    from harness.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.on_too_long='drop' \(allowed: one of skip, error\)"):
        compose(["data.on_too_long=drop"])


def test_jsonl_image_under_an_unknown_key_is_an_error(compose, tmp_path):
    rows = image_rows(tmp_path, 4)
    for r in rows:
        r["img"] = r.pop("image")
    path = write_rows(tmp_path / "d.jsonl", rows)
    _, run = compose(["data=jsonl", f"data.path={path}"])
    with pytest.raises(DataError, match=r"d\.jsonl:1: key 'img' holds an image path .*rename 'img' to 'image'"):
        build_datasets(run.data, run.seed)


def test_jsonl_unknown_keys_are_warned_once(compose, tmp_path, caplog):
    rows = [dict(r, id=i, meta={"x": 1}) for i, r in enumerate(image_rows(tmp_path, 4))]
    path = write_rows(tmp_path / "d.jsonl", rows)
    _, run = compose(["data=jsonl", f"data.path={path}"])
    with caplog.at_level(logging.WARNING, logger="harness.data.jsonl"):
        build_datasets(run.data, run.seed)
    warned = [r.getMessage() for r in caplog.records if "ignoring keys" in r.getMessage()]
    assert len(warned) == 1 and "id, meta" in warned[0] and "image, images" in warned[0]


def test_hf_image_column_with_another_name_is_used(compose, tmp_path):
    import datasets

    rows = {"picture": [image(i) for i in range(6)], "question": ["q"] * 6, "answer": list("abcdef")}
    feats = datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "ds"))
    _, run = compose(["data=hf", f"data.path={tmp_path / 'ds'}"])
    splits = build_datasets(run.data, run.seed)
    assert all(len(s["images"]) == 1 for s in splits.train + splits.eval)
    assert {s["source"] for s in splits.train + splits.eval} == {f"train[{i}]" for i in range(6)}


def test_hf_image_path_column_without_image_column_is_an_error(compose, tmp_path):
    import datasets

    rows = {"file": [f"img/{i}.png" for i in range(4)], "question": ["q"] * 4, "answer": list("abcd")}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    _, run = compose(["data=hf", f"data.path={tmp_path / 'ds'}"])
    with pytest.raises(DataError, match=r"column 'file' holds image paths.*data.columns.image=file"):
        build_datasets(run.data, run.seed)


def test_vlm_with_no_image_at_all_fails_unless_allowed(compose, processor, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": f"Say {i}", "answer": str(i)} for i in range(6)])
    _, run = compose(["data=jsonl", f"data.path={path}"])
    splits = build_datasets(run.data, run.seed)
    with pytest.raises(DataError, match=r"none of the \d+ train samples has an image.*'image' or 'images'.*"
                                        r"data.allow_text_only=true"):
        check_data(splits, ChatCollator(processor), run.data)
    _, run = compose(["data=jsonl", f"data.path={path}", "data.allow_text_only=true"])
    out = check_data(splits, ChatCollator(processor), run.data)
    assert out.stats["train_without_images"] == len(out.train) > 0 and out.stats["train_with_images"] == 0


def test_vlm_with_some_text_only_samples_warns_with_the_count(processor, compose, caplog):
    _, run = compose(["logger=none"])
    train = [{"images": [image(0)], "prompt": "p", "answer": "1"}, {"images": [], "prompt": "p", "answer": "2"},
             {"images": [], "prompt": "p", "answer": "3"}]
    with caplog.at_level(logging.WARNING, logger="harness.data.lengths"):
        out = check_data(Splits(train, []), ChatCollator(processor), run.data)
    assert any("2 of 3 train samples have NO image" in r.getMessage() for r in caplog.records)
    assert (out.stats["train_with_images"], out.stats["train_without_images"]) == (1, 2)


def test_non_utf8_line_is_skipped_with_its_line_number(compose, tmp_path):
    path = tmp_path / "d.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "answer": str(i)}).encode() for i in range(4)]
    path.write_bytes(b"\n".join(good[:2] + [b'{"prompt": "caf\xe9", "answer": "1"}'] + good[2:]) + b"\n")
    _, run = compose(["data=jsonl", f"data.path={path}"])
    splits = build_datasets(run.data, run.seed)
    assert splits.stats["skipped"] == 1 and len(splits.train) + len(splits.eval) == 4
    assert splits.stats["reasons"][0].startswith(f"{path}:3: not valid UTF-8 at byte 15 of the line (b'\\xe9")


@pytest.mark.parametrize("bad_row, reason", [
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\].content: content must be a string or a list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"text": "x"}}]},
     r"messages\[1\].content: content must be a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\].content\[0\].text: expected a string"),
    ({"messages": [{"role": "user", "content": ["plain string item"]}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\].content\[0\]: a content item must be an object"),
    ({"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\].role: expected a string"),
    ({"messages": ["hello", {"role": "assistant", "content": "x"}]}, r"messages\[0\]: a turn must be an object"),
    ({"prompt": "p", "answer": {"label": 3}}, r"answer: expected a string, got dict"),
    ({"prompt": ["p"], "answer": "a"}, r"prompt: expected a string, got list"),
    ({"images": 5, "prompt": "p", "answer": "a"}, r"expected a relative image path, got 5"),
    ({"images": [{"x": 1}], "prompt": "p", "answer": "a"}, r"expected a relative image path"),
])
def test_malformed_rows_are_skipped_with_the_line_number(compose, tmp_path, bad_row, reason):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(4)]
    path = write_rows(tmp_path / "d.jsonl", rows[:1] + [bad_row] + rows[1:])
    _, run = compose(["data=jsonl", f"data.path={path}"])
    splits = build_datasets(run.data, run.seed)
    assert splits.stats["skipped"] == 1 and len(splits.train) + len(splits.eval) == 4
    assert splits.stats["reasons"][0].startswith(f"{path}:2: ")
    assert re.search(reason, splits.stats["reasons"][0]), splits.stats["reasons"][0]
    _, run = compose(["data=jsonl", f"data.path={path}", "data.on_bad_sample=error"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*data.on_bad_sample=skip"):
        build_datasets(run.data, run.seed)


def test_hf_non_string_answer_is_a_bad_sample(compose, tmp_path):
    import datasets

    rows = {"question": ["q"] * 4, "answer": [["a"], ["b", "c"], [], ["d"]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    _, run = compose(["data=hf", f"data.path={tmp_path / 'ds'}"])
    with pytest.raises(DataError, match=r"no usable samples.*4 skipped.*train\[0\]: answer: expected a string, "
                                        r"got list"):
        build_datasets(run.data, run.seed)


def test_collator_last_resort_check_names_the_samples(processor):
    samples = [{"images": [], "prompt": "word " * 50, "answer": "1", "source": "d.jsonl:9"}]
    with pytest.raises(ValueError, match=r"more than data.max_length=16 \(samples: d\.jsonl:9\)"):
        ChatCollator(processor, max_length=16)(samples)


class RejectingCollator:
    """Measures every sample at 10 tokens except those whose prompt is 'reject' (a processor error)."""

    multimodal = False

    def measure(self, samples):
        if any(s["prompt"] == "reject" for s in samples):
            raise RuntimeError("processor says no")
        return [10] * len(samples)


def test_sample_the_processor_rejects_is_a_bad_sample(compose):
    _, run = compose(["logger=none"])
    train = [{"images": [], "prompt": p, "answer": "a", "source": f"x[{i}]"} for i, p in enumerate("ab")] + \
        [{"images": [], "prompt": "reject", "answer": "a"}]
    out = check_data(Splits(train, []), RejectingCollator(), run.data)
    assert len(out.train) == 2 and out.stats["skipped"] == 1 and out.stats["too_long"] == 0
    assert out.stats["reasons"] == ["train[2]: the processor cannot encode it: RuntimeError: processor says no"]
    _, run = compose(["logger=none", "data.on_bad_sample=error"])
    with pytest.raises(DataError, match=r"train\[2\]: the processor cannot encode it"):
        check_data(Splits(train, []), RejectingCollator(), run.data)

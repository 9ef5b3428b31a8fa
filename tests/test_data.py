"""Data options (digits_vqa, synthetic_ocr, jsonl, hf), bad-sample handling, path safety, CER."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from harness.collator import IGNORE_INDEX, ChatCollator
from harness.config import ConfigError
from harness.data import build_datasets
from harness.evaluate import cer, levenshtein
from harness.processors import build_local_processor
from harness.registry import get_architecture

TINY = ["logger=none", "data.max_eval_samples=4"]


@pytest.fixture(scope="module")
def processor():
    return build_local_processor(get_architecture("qwen2_vl"), 56 * 56, 56 * 56)


def image(mode="RGB", size=(56, 40), seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE)
    return img.convert(mode)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl_dir(tmp_path):
    """tmp/data.jsonl + tmp/img/*.png in L, RGBA, P and RGB modes; rows of every accepted shape."""
    (tmp_path / "img").mkdir()
    modes = ["L", "RGBA", "P", "RGB"]
    for i in range(12):
        image(modes[i % 4], seed=i).save(tmp_path / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "prompt": "What is shown?", "answer": f"a{i}"} for i in range(8)]
    rows.append({"images": ["img/8.png", "img/9.png"], "question": "Two images?", "answer": "yes"})
    rows.append({"prompt": "Say hi", "answer": "hi"})  # text-only
    rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/10.png"},
                                                           {"type": "text", "text": "Read it"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "x^2"}]}]})
    rows.append({"image": "img/11.png", "messages": [{"role": "user", "content": "Read this"},
                                                     {"role": "assistant", "content": "\\frac{a}{b}"}]})
    write_jsonl(tmp_path / "data.jsonl", rows)
    return tmp_path


@pytest.fixture
def hf_dir(tmp_path):
    import datasets

    rows = {"img": [image("L" if i % 2 else "RGBA", seed=i) for i in range(10)],
            "q": ["What text is in the image?"] * 10, "a": [f"w{i}" for i in range(10)]}
    feats = datasets.Features({"img": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def check_labels(processor, samples):
    """Each sample's labels are exactly the answer's tokens + <|im_end|>, at the end of its real tokens."""
    tok = processor.tokenizer
    batch = ChatCollator(processor)(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, s in enumerate(samples):
        n = int(mask[i].sum())
        answer = tok(s["answer"], add_special_tokens=False)["input_ids"] + [end]
        want = [IGNORE_INDEX] * (n - len(answer)) + answer + [IGNORE_INDEX] * (ids.shape[1] - n)
        assert labels[i].tolist() == want
        assert ids[i, n - len(answer):n].tolist() == answer
        assert tok.decode(labels[i][labels[i] != IGNORE_INDEX]) == s["answer"] + "<|im_end|>"
        n_img = len(s["images"])
        assert (ids[i] == tok.convert_tokens_to_ids("<|vision_start|>")).sum() == n_img
    return batch


def overrides_for(option, tmp_path, jsonl_dir=None, hf_dir=None):
    return {"digits_vqa": ["data=digits_vqa"],
            "synthetic_ocr": ["data=synthetic_ocr", "data.n_train=16", "data.n_eval=4", "data.max_chars=12"],
            "jsonl": ["data=jsonl", f"data.path={jsonl_dir}/data.jsonl"],
            "hf": ["data=hf", f"data.path={hf_dir}", "data.columns.image=img", "data.columns.prompt=q", "data.columns.answer=a"]}[option]


@pytest.mark.parametrize("option", ["digits_vqa", "synthetic_ocr", "jsonl", "hf"])
def test_each_option_masks_everything_but_the_answer(option, compose, processor, tmp_path, jsonl_dir, hf_dir):
    _, run = compose(TINY + overrides_for(option, tmp_path, jsonl_dir, hf_dir))
    splits = build_datasets(run.data, run.seed)
    train, evals = splits
    assert train and evals and splits.stats["skipped"] == 0
    for s in train + evals:
        assert all(im.mode == "RGB" for im in s["images"]) and isinstance(s["answer"], str)
    # every sample of the small sources, in batches of 4 (jsonl: mixed 0 / 1 / 2-image batches)
    pool = (train + evals) if option in ("jsonl", "hf") else train[:6]
    for i in range(0, len(pool), 4):
        check_labels(processor, pool[i:i + 4])
    if option == "jsonl":
        got = {s["answer"]: s for s in train + evals}
        assert len(got) == 12 and len(got["yes"]["images"]) == 2 and got["hi"]["images"] == []
        assert got["x^2"]["prompt"] == "Read it" and len(got["x^2"]["images"]) == 1
        assert got["\\frac{a}{b}"]["prompt"] == "Read this" and len(got["\\frac{a}{b}"]["images"]) == 1
        assert got["yes"]["prompt"] == "Two images?"


def test_jsonl_split_is_seeded(compose, jsonl_dir):
    _, run = compose(TINY[:1] + ["data=jsonl", f"data.path={jsonl_dir}/data.jsonl", "data.eval_fraction=0.25"])
    a, b = build_datasets(run.data, 1), build_datasets(run.data, 1)
    c = build_datasets(run.data, 2)
    answers = lambda s: [x["answer"] for x in s]
    assert answers(a.eval) == answers(b.eval) and len(a.eval) == 3 and len(a.train) == 9
    assert answers(a.eval) != answers(c.eval) or answers(a.train) != answers(c.train)


def test_synthetic_ocr_is_seeded_and_respects_lengths(compose):
    _, run = compose(["data=synthetic_ocr", "data.n_train=40", "data.n_eval=5", "data.min_chars=2",
                      "data.max_chars=3", "data.text_kinds=[number,formula]"])
    a, b = build_datasets(run.data, 0), build_datasets(run.data, 0)
    assert [s["answer"] for s in a.train] == [s["answer"] for s in b.train]
    assert np.array_equal(np.asarray(a.train[0]["images"][0]), np.asarray(b.train[0]["images"][0]))
    assert all(2 <= len(s["answer"]) <= 3 for s in a.train + a.eval)
    assert all(s["prompt"] == "What text is in the image?" for s in a.train)
    sizes = {s["images"][0].size for s in a.train}
    assert len(sizes) > 1  # varying image sizes


def test_mixed_batch_two_images_and_none_trains(compose, processor):
    """One sample with 2 images, one text-only, in one batch: collates and the tiny Qwen2-VL takes it."""
    import torch

    from harness.pipeline import build

    samples = [{"images": [image("L", seed=1), image("RGBA", (84, 56), seed=2)], "prompt": "Compare", "answer": "ab"},
               {"images": [], "prompt": "No image here", "answer": "c"}]
    batch = check_labels(processor, samples)
    assert batch["image_grid_thw"].shape[0] == 2
    _, run = compose(["logger=none", "device=cpu"])
    _, _, _, _, model = build(run)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def bad_jsonl(tmp_path, n_good=14):
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n_good):
        image("RGB", seed=i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prompt": "What?", "answer": str(i % 10)})
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rows.append({"image": "img/corrupt.png", "prompt": "What?", "answer": "1"})
    rows.append({"image": "img/missing.png", "prompt": "What?", "answer": "2"})
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_samples_are_skipped_counted_and_training_runs(compose, tmp_path):
    from harness.pipeline import train_run
    from harness.summary import format_summary

    path = bad_jsonl(tmp_path)
    _, run = compose(["logger=none", "device=cpu", "data=jsonl", f"data.path={path}", "train.max_steps=2",
                      "train.per_device_train_batch_size=4", "train.warmup_steps=0", "train.eval_batch_size=8",
                      "save.adapter=false"])
    m = train_run(run, {}, tmp_path / "run")
    assert m["data_skipped"] == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["data_skipped"] == 2 and any("corrupt.png" in r for r in saved["data_skip_reasons"])
    assert any("missing.png" in r for r in saved["data_skip_reasons"])
    assert 0.0 <= saved["eval_cer"] and not math.isnan(saved["eval_cer"]) and 0 <= saved["eval_exact_match"] <= 1
    assert "bad samples skipped" in format_summary(m) and "eval CER" in format_summary(m)


def test_bad_sample_error_mode_names_the_file(compose, tmp_path):
    path = bad_jsonl(tmp_path, n_good=2)
    _, run = compose(["logger=none", "data=jsonl", f"data.path={path}", "data.on_bad_sample=error"])
    with pytest.raises(ValueError, match=r"corrupt\.png"):
        build_datasets(run.data, run.seed)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    write_jsonl(path, [r for r in rows if "corrupt" not in r["image"]])
    with pytest.raises(ValueError, match=r"missing\.png"):
        build_datasets(run.data, run.seed)


def test_hf_missing_column_lists_existing_columns(compose, hf_dir):
    _, run = compose(["data=hf", f"data.path={hf_dir}", "data.columns.image=img", "data.columns.prompt=q",
                      "data.columns.answer=label"])
    with pytest.raises(ValueError, match=r"'label'.*img, q, a"):
        build_datasets(run.data, run.seed)
    _, run = compose(["data=hf", f"data.path={hf_dir}"])  # defaults image/prompt/answer do not exist here
    with pytest.raises(ValueError, match=r"columns: img, q, a"):
        build_datasets(run.data, run.seed)


def test_hf_corrupt_image_is_skipped(compose, tmp_path):
    import datasets

    good = [open_bytes(image(seed=i)) for i in range(4)]
    rows = {"image": [{"bytes": b, "path": None} for b in good] + [{"bytes": b"garbage", "path": None}],
            "question": ["q"] * 5, "answer": list("abcde")}
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "ds"))
    _, run = compose(["data=hf", f"data.path={tmp_path / 'ds'}"])
    splits = build_datasets(run.data, run.seed)
    assert splits.stats["skipped"] == 1 and len(splits.train) + len(splits.eval) == 4
    _, run = compose(["data=hf", f"data.path={tmp_path / 'ds'}", "data.on_bad_sample=error"])
    with pytest.raises(ValueError, match=r"train\[4\]"):
        build_datasets(run.data, run.seed)


def open_bytes(img):
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bad_path", ["../outside.png", "img/../../outside.png", "ABS"])
def test_jsonl_refuses_paths_outside_its_directory(compose, tmp_path, bad_path):
    (tmp_path / "sub").mkdir()
    image().save(tmp_path / "outside.png")
    bad_path = str(tmp_path / "outside.png") if bad_path == "ABS" else bad_path
    path = write_jsonl(tmp_path / "sub" / "d.jsonl", [{"image": bad_path, "prompt": "p", "answer": "a"}] * 3)
    _, run = compose(["data=jsonl", f"data.path={path}"])  # refused even with on_bad_sample=skip
    with pytest.raises(PermissionError, match="outside the data file's directory"):
        build_datasets(run.data, run.seed)


def test_empty_dataset_is_a_clear_error(compose, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _, run = compose(["data=jsonl", f"data.path={empty}"])
    with pytest.raises(ValueError, match=r"data=jsonl \(data.path=.*empty.jsonl\): no usable samples"):
        build_datasets(run.data, run.seed)
    allbad = write_jsonl(tmp_path / "allbad.jsonl", [{"image": "nope.png", "prompt": "p", "answer": "a"}])
    _, run = compose(["data=jsonl", f"data.path={allbad}"])
    with pytest.raises(ValueError, match=r"allbad.jsonl.*1 skipped.*nope.png"):
        build_datasets(run.data, run.seed)


def test_data_config_validation(compose):
    with pytest.raises(ConfigError, match=r"data.on_bad_sample='maybe' \(allowed: one of skip, error\)"):
        compose(["data.on_bad_sample=maybe"])
    with pytest.raises(ConfigError, match=r"data.path=None"):
        compose(["data=jsonl"])
    with pytest.raises(ConfigError, match=r"data.max_chars=2"):
        compose(["data=synthetic_ocr", "data.min_chars=3", "data.max_chars=2"])
    with pytest.raises(ConfigError, match=r"data.text_kinds"):
        compose(["data=synthetic_ocr", "data.text_kinds=[poem]"])


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "abc", 0), ("", "abc", 3), ("abc", "", 3),
                                   ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("x^2+3=7", "x^2+3=1", 1),
                                   ("\\frac{a}{b}", "\\frac{b}{a}", 2), ("ab", "ba", 2), ("intention", "execution", 5)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_cer_is_total_edits_over_total_reference_chars():
    assert cer(["abc"], ["abc"]) == 0.0
    assert cer(["sitting"], ["kitten"]) == pytest.approx(3 / 6)
    # corpus-level: (1 + 2) / (4 + 2), not the mean of per-sample rates (0.25 + 1.0) / 2
    assert cer(["abcx", "wxyz"], ["abcd", "wx"]) == pytest.approx(3 / 6)
    assert cer([" a  b "], ["a b"]) == 0.0  # normalized like exact match
    assert cer(["", "12"], ["7", "12"]) == pytest.approx(1 / 3)
    assert math.isnan(cer([], []))

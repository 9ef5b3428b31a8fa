"""Label masking: only the assistant's answer (and its end-of-turn token) is trained on."""
import numpy as np
import pytest
from PIL import Image

from harness.collator import IGNORE_INDEX, ChatCollator
from harness.processors import build_local_processor
from harness.registry import get_architecture


@pytest.fixture(scope="module")
def processor():
    return build_local_processor(get_architecture("qwen2_vl"), 56 * 56, 56 * 56)


def sample(answer, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    return {"images": [img], "prompt": "What digit is this?", "answer": answer}


def test_labels_are_exactly_the_answer_tokens(processor):
    tok = processor.tokenizer
    samples = [sample("7", 0), sample("1234", 1)]
    batch = ChatCollator(processor)(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, s in enumerate(samples):
        # by hand: the templated prompt, 4 image tokens (56x56 -> 4x4 patches -> 2x2 merged), answer, <|im_end|>
        prompt = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4
                  + "<|vision_end|>What digit is this?<|im_end|>\n<|im_start|>assistant\n")
        expected = tok(prompt + s["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n = len(expected)
        assert ids[i, :n].tolist() == expected
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        n_answer = len(tok(s["answer"], add_special_tokens=False)["input_ids"]) + 1
        want = [IGNORE_INDEX] * (n - n_answer) + expected[n - n_answer:] + [IGNORE_INDEX] * (ids.shape[1] - n)
        assert labels[i].tolist() == want
        assert tok.decode(labels[i][labels[i] != IGNORE_INDEX]) == s["answer"] + "<|im_end|>"
        assert (labels[i][ids[i] == image_id] == IGNORE_INDEX).all()
        assert (ids[i] == image_id).sum() == 4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    # Qwen2-VL's forward needs mm_token_type_ids: 1 exactly at image tokens
    assert (batch["mm_token_type_ids"].bool() == (ids == image_id)).all()


def test_full_sequence_labels_still_mask_images_and_padding(processor):
    samples = [sample("7", 0), sample("1234", 1)]
    batch = ChatCollator(processor, train_on_responses_only=False)(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    trained = labels != IGNORE_INDEX
    assert (trained == (mask.bool() & (ids != image_id))).all()


def test_generation_prompts_are_left_padded(processor):
    c = ChatCollator(processor)
    batch = c.prompts([sample("7", 0), {"images": [], "prompt": "Hi there, how are you?", "answer": "x"}])
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1] and mask[:, -1].all()  # real tokens end at the right edge
    short = lengths.index(min(lengths))
    assert mask[short].tolist() == [0] * (mask.shape[1] - lengths[short]) + [1] * lengths[short]
    tok = processor.tokenizer
    assert tok.decode(batch["input_ids"][0][mask[0].bool()]).endswith("<|im_start|>assistant\n")

"""The Python API (harness.api): the seeds' Unsloth recipes run against tiny local checkpoints with only the import
changed, and land on the CLI's plan, LoRA modules, training, merged export and hub push."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness import modeling
from harness.lora import lora_state
from harness.pipeline import make_plan

# the CLI's plan for the same flags: the checkpoint planned from its own config.json, no preset head training
CKPT_OVERRIDES = ["logger=none", "mode=plan", "model.config=null", "model.modules_to_save=[]"]


def _save_tiny(compose, tmp_path_factory, preset: str, name: str):
    _, run = compose(["logger=none", f"model={preset}"])
    processor = modeling.load_processor_for(run.model)
    model = modeling.load_model(run.model, run.quant, torch.device("cpu"), processor, seed=1)
    path = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vlm_ckpt(compose, tmp_path_factory):
    """A tiny Qwen2-VL (conf/model/tiny_qwen2_vl.yaml, random weights) saved with its processor."""
    return _save_tiny(compose, tmp_path_factory, "tiny_qwen2_vl", "tiny_vl")


@pytest.fixture(scope="module")
def text_ckpt(compose, tmp_path_factory):
    return _save_tiny(compose, tmp_path_factory, "tiny_qwen2", "tiny_text")


def cli_plan(compose, ckpt, *overrides):
    _, run = compose([*CKPT_OVERRIDES, f"model.name_or_path={ckpt}", *overrides])
    return make_plan(run)


def lora_modules(model) -> set:
    return {n.split(".lora_A.")[0].replace("base_model.model.", "", 1) for n, _ in model.named_parameters()
            if ".lora_A." in n}


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


def test_import_harness_stays_light():
    code = ("import sys, harness; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from harness import FastVisionModel, FastLanguageModel, VisionDataCollator, UnslothVisionDataCollator; "
            "assert UnslothVisionDataCollator.__mro__[1] is VisionDataCollator")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the seeds' practical-guide recipes (seed 001 / 000), import line changed -------------------------------------

def recipe_both(model):
    from harness import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        r=16,
        target_modules="all-linear",
        finetune_vision_layers=True,      # Train vision encoder
        finetune_language_layers=True,    # Train language model
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
    )


def recipe_language_only(model):
    from harness import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        r=16,
        finetune_vision_layers=False,     # Freeze vision
        finetune_language_layers=True,
    )


def recipe_vision_only(model):
    from harness import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        r=32,
        finetune_vision_layers=True,
        finetune_language_layers=False,   # Freeze language
    )


def recipe_attention_only(model):
    from harness import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        finetune_vision_layers=True,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=False,  # Skip MLP layers
        use_gradient_checkpointing="unsloth",
    )


RECIPES = {  # recipe -> the CLI overrides of the same flags, and a module every LoRA target's name must match
    "both": (recipe_both, ["lora_strategy=custom", "lora.target_modules=all-linear"], None),
    "language_only": (recipe_language_only, ["lora_strategy=language_only"], "model.language_model."),
    "vision_only": (recipe_vision_only, ["lora_strategy=vision_only", "lora.r=32"], "model.visual.blocks."),
    "attention_only": (recipe_attention_only, ["lora_strategy=attention_only"], "attn"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_what_the_cli_plans(compose, vlm_ckpt, name, capsys):
    from harness import FastVisionModel, cli_overrides, harness_plan, harness_run_config

    recipe, overrides, where = RECIPES[name]
    model, processor = FastVisionModel.from_pretrained(model_name=vlm_ckpt, max_seq_length=2048, load_in_4bit=False)
    model = recipe(model)
    plan = cli_plan(compose, vlm_ckpt, *overrides)
    trainable, total = modeling.count_params(model)
    assert trainable == plan.trainable_params == model.get_nb_trainable_parameters()[0]
    assert lora_modules(model) == set(plan.names) and plan.names == harness_plan(model).names
    assert (trainable, total) == (harness_plan(model).trainable_params, harness_plan(model).total_params)
    if where:
        assert all(where in n for n in plan.names)
    assert "LoRA target plan: model=tiny_vl" in capsys.readouterr().out  # printed like `harness mode=plan`
    # the same plan handed to a CLI run
    _, run = compose(["mode=plan", *cli_overrides(model)])
    assert make_plan(run).names == plan.names and run.lora == harness_run_config(model).lora


def test_recipe_4bit_vision_and_language(compose, vlm_ckpt):
    from harness import FastVisionModel

    model, tokenizer = FastVisionModel.from_pretrained(model_name=vlm_ckpt, max_seq_length=2048, load_in_4bit=True)
    assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=32, lora_dropout=0, bias="none",
                                           use_gradient_checkpointing="unsloth", random_state=3407)
    plan = cli_plan(compose, vlm_ckpt, "lora_strategy=full", "quant=4bit", "lora.lora_alpha=32")
    assert modeling.count_params(model)[0] == plan.trainable_params and lora_modules(model) == set(plan.names)


# ---- seed 003: training on an OCR dataset with SFTTrainer -----------------------------------------------------------

def ocr_dataset(n=16):
    return [{"question": "What text is this?", "image": im, "answer": str(1000 + i)}
            for i, im in enumerate(images(n))]


def test_ocr_recipe_trains_with_sfttrainer(vlm_ckpt, tmp_path, nf4_by_definition):
    import datasets
    from harness import FastVisionModel
    from harness import UnslothVisionDataCollator
    from trl import SFTTrainer, SFTConfig

    # Load model
    model, tokenizer = FastVisionModel.from_pretrained(
        model_name=vlm_ckpt,
        load_in_4bit=True,
    )

    # Add LoRA
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=True,
        finetune_language_layers=True,
        r=16,
        lora_alpha=32,
    )

    # Prepare dataset with images
    def format_sample(sample):
        return {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "OCR assistant"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": sample["question"]},
                    {"type": "image", "image": sample["image"]},
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": sample["answer"]}]},
            ]
        }

    dataset = ocr_dataset()  # seed: load_dataset("your-ocr-dataset", split="train")
    # TRL >= 1 takes a datasets.Dataset, not the seed's list (the rows come back with the images as bytes)
    train_dataset = datasets.Dataset.from_list([format_sample(s) for s in dataset])

    # Enable training mode
    FastVisionModel.for_training(model)
    before = lora_state(model)

    # Setup trainer with vision data collator
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,  # the seed's tokenizer= (TRL < 0.12 spelling)
        data_collator=UnslothVisionDataCollator(model, tokenizer),
        train_dataset=train_dataset,
        args=SFTConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=2,
            learning_rate=2e-4,
            output_dir=str(tmp_path / "vision_output"),
            remove_unused_columns=False,
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
            use_cpu=True, bf16=False, report_to=[],  # CPU-only machine (SFTConfig asks for bf16 on a GPU)
        ),
    )

    result = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(result.training_loss)
    after = lora_state(model)
    b_names = [n for n in before if "lora_B" in n]
    assert b_names and all(not torch.equal(before[n], after[n]) for n in b_names)


def test_collator_batches_the_ocr_messages_like_the_cli(vlm_ckpt):
    from harness import FastVisionModel, UnslothVisionDataCollator, VisionDataCollator
    from harness.collator import ChatCollator

    model, processor = FastVisionModel.from_pretrained(vlm_ckpt)
    (im,) = images(1)
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Read it"},
                                                     {"type": "image", "image": im}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "42"}]}]}
    batch = VisionDataCollator(model, processor)([row])
    want = ChatCollator(processor)([{"prompt": "Read it", "answer": "42", "images": [im]}])
    assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch["labels"], want["labels"])
    assert (batch["labels"] != -100).sum() == len("42") + 1  # answer bytes + end of turn
    full = UnslothVisionDataCollator(model, processor)([row])["labels"]
    assert (full != -100).sum() > (batch["labels"] != -100).sum()  # Unsloth's default: every non-image token
    assert not (full == processor.image_token_id).any()
    with pytest.raises(ValueError, match=r"batch row 0 has \['text'\]; allowed: \{\"messages\""):
        VisionDataCollator(model, processor)([{"text": "x"}])
    with pytest.raises(TypeError, match="resize"):
        VisionDataCollator(model, processor, resize="min")


# ---- inference, export, hub push -----------------------------------------------------------------------------------

@pytest.fixture
def trained_vl(vlm_ckpt):
    """A LoRA model whose B weights are non-zero (a merge that changes the weights)."""
    from harness import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(vlm_ckpt)
    model = FastVisionModel.get_peft_model(model, r=8, finetune_vision_layers=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, processor


def _inputs(processor, im):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "Read it"}]}],
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[im], return_tensors="pt")


def test_for_inference_generates_and_for_training_restores(trained_vl):
    from harness import FastVisionModel

    model, processor = trained_vl
    FastVisionModel.for_inference(model)
    assert not model.training and model.config.use_cache and processor.tokenizer.padding_side == "left"
    out = model.generate(**_inputs(processor, images(1)[0]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3
    FastVisionModel.for_training(model)
    assert model.training and not model.config.use_cache and processor.tokenizer.padding_side == "right"


def test_save_pretrained_merged_loads_with_plain_transformers(trained_vl, tmp_path):
    import peft
    from transformers import AutoModelForImageTextToText

    model, processor = trained_vl
    model.eval()
    inputs = _inputs(processor, images(1)[0])
    with torch.no_grad():
        want = model(**inputs).logits
    merged_dir = model.save_pretrained_merged(tmp_path / "merged", processor, save_method="merged_16bit")
    assert lora_modules(model), "the trained model keeps its adapters"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**inputs).logits
    assert torch.allclose(got, want, atol=0.05), (got - want).abs().max()  # bf16 weights
    assert (merged_dir / "preprocessor_config.json").exists() or (merged_dir / "processor_config.json").exists()

    model.save_pretrained_merged(tmp_path / "lora", processor, save_method="lora")
    base = AutoModelForImageTextToText.from_pretrained(json.loads(
        (tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"])
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, want, atol=1e-4)


def test_push_to_hub_merged_uploads_the_merged_folder(trained_vl, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeHfApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, exist_ok=False, private=None, **kw):
            calls.append(("create_repo", repo_id, exist_ok, private))

        def upload_folder(self, repo_id, folder_path, **kw):
            from pathlib import Path

            files = sorted(p.name for p in Path(folder_path).iterdir())
            cfg = json.loads((Path(folder_path) / "config.json").read_text())
            calls.append(("upload_folder", repo_id, files, cfg["model_type"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    model, processor = trained_vl
    with pytest.raises(ValueError, match="token=None and HF_TOKEN is not set"):
        model.push_to_hub_merged("user/tiny", processor)
    model.push_to_hub_merged("user/tiny", processor, token="hf_secret_value")
    assert calls[0] == ("init", "hf_secret_value") and calls[1] == ("create_repo", "user/tiny", True, True)
    _, repo, files, model_type = calls[2]
    assert repo == "user/tiny" and model_type == "qwen2_vl"
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.startswith("adapter") for f in files)  # merged, not the adapter
    assert "hf_secret_value" not in repr(vars(model))


# ---- FastLanguageModel (seed 002) ----------------------------------------------------------------------------------

def test_fast_language_model_recipes(compose, text_ckpt, tmp_path, nf4_by_definition):
    import datasets
    from harness import FastLanguageModel, VisionDataCollator
    from trl import SFTConfig, SFTTrainer

    # Load model first
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name = text_ckpt,
        max_seq_length = 2048,
        load_in_4bit = True,
    )
    assert "Tokenizer" in type(tokenizer).__name__ and not hasattr(tokenizer, "image_processor")

    # Add LoRA adapters with default settings
    model = FastLanguageModel.get_peft_model(
        model,
        r = 16,              # Rank 16 - good balance
        lora_alpha = 16,     # Alpha = r for stable training
        lora_dropout = 0,    # No dropout for speed
        target_modules = [
            "q_proj", "k_proj", "v_proj", "o_proj",
            "gate_proj", "up_proj", "down_proj",
        ],
        use_gradient_checkpointing = "unsloth",  # Optimized checkpointing
        random_state = 3407,
    )
    model.print_trainable_parameters()
    plan = cli_plan(compose, text_ckpt, "model=tiny_qwen2", "quant=4bit", "lora_strategy=custom",
                    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    assert modeling.count_params(model)[0] == plan.trainable_params and lora_modules(model) == set(plan.names)

    rows = [{"messages": [{"role": "user", "content": f"Add one to {i}"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(8)]
    before = lora_state(model)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, data_collator=VisionDataCollator(model, tokenizer),
                         train_dataset=datasets.Dataset.from_list(rows),
                         args=SFTConfig(per_device_train_batch_size=4, max_steps=2, learning_rate=2e-4,
                                        output_dir=str(tmp_path / "out"), remove_unused_columns=False,
                                        dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True},
                                        use_cpu=True, bf16=False, report_to=[]))
    assert np.isfinite(trainer.train().training_loss)
    assert all(not torch.equal(before[n], p) for n, p in lora_state(model).items() if "lora_B" in n)


def test_fast_language_model_embeddings_and_layers(compose, text_ckpt):
    from harness import FastLanguageModel

    for extra, overrides in [
        (dict(modules_to_save=["embed_tokens", "lm_head"]), ["lora.modules_to_save=[embed_tokens,lm_head]"]),
        (dict(layers_to_transform=list(range(2, 4))), ["lora.layers_to_transform=[2,3]"]),
    ]:
        model, _ = FastLanguageModel.from_pretrained(model_name=text_ckpt, max_seq_length=2048)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                 "v_proj", "o_proj"], use_gradient_checkpointing="unsloth", **extra)
        plan = cli_plan(compose, text_ckpt, "model=tiny_qwen2", "lora_strategy=custom",
                        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", *overrides)
        assert modeling.count_params(model)[0] == plan.trainable_params and lora_modules(model) == set(plan.names)


# ---- bad arguments name the parameter ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(device_map="balanced"), ValueError, r"device_map='balanced' is not supported \(allowed: None, 'auto'"),
    (dict(revision="v2"), ValueError, r"revision='v2'.*allowed: None"),
    (dict(token="hf_x"), ValueError, r"token is not passed through.*allowed: None"),
    (dict(load_in_4bit=True, load_in_8bit=True), ValueError, r"load_in_4bit and load_in_8bit.*allowed: at most one"),
    (dict(dtype="int8"), ValueError, r"dtype='int8' is not supported \(allowed: None"),
    (dict(use_gradient_checkpointing="always"), ValueError, r"use_gradient_checkpointing='always'.*allowed: 'unsloth'"),
    (dict(full_finetuning=True, load_in_4bit=True), ValueError, r"full_finetuning=True with load_in_4bit"),
    (dict(max_seq_length=0), ValueError, r"max_seq_length=0 \(allowed: None or an integer > 0\)"),
    (dict(fast_inference=True), ValueError, r"fast_inference.*allowed: False"),
    (dict(gpu_memory_utilization=0.5), TypeError, r"unexpected keyword argument\(s\): gpu_memory_utilization"),
])
def test_from_pretrained_bad_arguments(vlm_ckpt, kwargs, error, match):
    from harness import FastVisionModel

    with pytest.raises(error, match=match):
        FastVisionModel.from_pretrained(vlm_ckpt, **kwargs)


def test_from_pretrained_bad_model_name(tmp_path, text_ckpt):
    from harness import FastVisionModel

    with pytest.raises(ValueError, match=r"parameter model_name:.*does not exist"):
        FastVisionModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"is a 'bert' checkpoint.*allowed model types: .*qwen2_vl"):
        FastVisionModel.from_pretrained(str(tmp_path / "bert"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueError, r"parameter r: invalid config: lora.r=0 \(allowed: an integer > 0\)"),
    (dict(bias="some"), ValueError, r"parameter bias: .*allowed: one of none, all, lora_only"),
    (dict(lora_dropout=1.5), ValueError, r"parameter lora_dropout: .*allowed: a number in \[0, 1\)"),
    (dict(target_modules=["qq_proj"]), ValueError, r"parameter target_modules: .*'qq_proj' \(nearest: q_proj"),
    (dict(target_modules=3), ValueError, r"target_modules=3 \(allowed: None"),
    (dict(finetune_vision_layers=False, finetune_language_layers=False), ValueError,
     r"parameter finetune_vision_layers / finetune_language_layers.*selects zero modules"),
    (dict(finetune_mlp_modules="no"), ValueError, r"finetune_mlp_modules='no' \(allowed: True or False\)"),
    (dict(use_gradient_checkpointing="fast"), ValueError, r"use_gradient_checkpointing='fast'"),
    (dict(init_lora_weights="eva"), ValueError, r"parameter init_lora_weights: .*data-driven"),
    (dict(loftq_config={"loftq_bits": 4}), ValueError, r"parameter loftq_config: .*unless lora.init_lora_weights=loftq"),
    (dict(modules_to_save="lm_head"), ValueError, r"modules_to_save='lm_head' \(allowed: None or a list"),
    (dict(max_seq_length=2048), TypeError, r"unexpected keyword argument\(s\): max_seq_length"),
])
def test_get_peft_model_bad_arguments(vlm_ckpt, kwargs, error, match):
    from harness import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(vlm_ckpt)
    with pytest.raises(error, match=match):
        FastVisionModel.get_peft_model(model, **kwargs)


def test_api_misuse_names_the_fix(vlm_ckpt, tmp_path):
    from harness import FastVisionModel

    with pytest.raises(ValueError, match=r"was not built by this API; allowed: the model returned by"):
        FastVisionModel.get_peft_model(torch.nn.Linear(2, 2))
    model, processor = FastVisionModel.from_pretrained(vlm_ckpt)
    with pytest.raises(ValueError, match=r"no LoRA adapters to merge"):
        model.save_pretrained_merged(tmp_path / "m", processor)
    model = FastVisionModel.get_peft_model(model, r=4)
    with pytest.raises(ValueError, match=r"already has LoRA adapters"):
        FastVisionModel.get_peft_model(model)
    with pytest.raises(ValueError, match=r"save_method='merged_4bit' is not supported \(allowed: merged_16bit, lora\)"):
        model.save_pretrained_merged(tmp_path / "m", processor, save_method="merged_4bit")


def test_full_finetuning_and_single_device_maps(vlm_ckpt):
    from harness import FastVisionModel, harness_plan, harness_run_config

    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu"), "auto", None):
        model, _ = FastVisionModel.from_pretrained(vlm_ckpt, device_map=device_map, full_finetuning=True)
        trainable, total = modeling.count_params(model)
        assert trainable == total and harness_plan(model) is None
        assert harness_run_config(model).train.full_finetuning and next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match=r"full_finetuning=True: every weight already trains"):
        FastVisionModel.get_peft_model(model)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device_map=0 but no CUDA device is available"):
            FastVisionModel.from_pretrained(vlm_ckpt, device_map=0)

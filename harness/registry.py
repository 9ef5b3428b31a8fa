"""Architecture registry: what is vision, projector and language in each supported model, as data.

Adding an architecture is one `Architecture` entry here plus a tiny config in conf/model/.
Module names are the ones transformers 5 gives (`model.visual...`, `model.language_model...`).
Nothing else in the harness branches on model names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


ATTENTION = r"\.(self_attn|cross_attn|attn|attention)\."
MLP = r"\.(mlp|feed_forward)\."
LAYER_INDEX = r"\.(?:layers|blocks)\.(\d+)\."


@dataclass(frozen=True)
class Architecture:
    name: str
    model_class: str  # transformers class built for this architecture
    config_class: str  # transformers config class taking conf/model/*.yaml's `config`
    auto_class: str  # AutoModel class a merged checkpoint loads with
    processor: str  # key of harness.processors.LOCAL_PROCESSORS (offline processor builder)
    language: tuple[str, ...]  # regexes (re.match on the full module name)
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    attention: str = ATTENTION  # re.search on the full module name
    mlp: str = MLP
    layer_index: str = LAYER_INDEX  # first group: the layer / block index
    output_head: tuple[str, ...] = ("lm_head",)
    # Special tokens of the chat format (used by the locally built tokenizer).
    special_tokens: dict = field(default_factory=dict)
    # Random-init models: config attribute -> special_tokens key, filled from the local tokenizer's ids.
    config_tokens: dict = field(default_factory=dict)
    # Random-init models: parameters (name suffixes) that the architecture initialises to zero so that a
    # pretrained checkpoint starts as a no-op, but that would cut a random model's image path; set to 1.
    random_init_open_gates: tuple[str, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        return bool(self.vision)

    def component(self, module_name: str) -> str | None:
        """'vision' | 'projector' | 'language' | None (output head, embeddings, anything else)."""
        for comp, patterns in (("projector", self.projector), ("vision", self.vision), ("language", self.language)):
            if any(re.match(p, module_name) for p in patterns):
                return comp
        return None

    def kind(self, module_name: str) -> str:
        """'attention' | 'mlp' | 'other'."""
        if re.search(self.attention, module_name):
            return "attention"
        if re.search(self.mlp, module_name):
            return "mlp"
        return "other"

    def layer(self, module_name: str) -> int | None:
        m = re.search(self.layer_index, module_name)
        return int(m.group(1)) if m else None


QWEN_TOKENS = dict(
    bos=None, eos="<|im_end|>", pad="<|endoftext|>",
    extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"],
    image="<|image_pad|>", video="<|video_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>",
)

QWEN_CONFIG_TOKENS = dict(image_token_id="image", video_token_id="video", vision_start_token_id="vision_start",
                          vision_end_token_id="vision_end")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(
            name="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            config_class="Qwen2VLConfig",
            auto_class="AutoModelForImageTextToText",
            processor="qwen2_vl",
            vision=(r"model\.visual\.blocks\.",),
            projector=(r"model\.visual\.merger\.",),
            language=(r"model\.language_model\.",),
            special_tokens=QWEN_TOKENS,
            config_tokens=QWEN_CONFIG_TOKENS,
        ),
        Architecture(
            name="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            config_class="Qwen2_5_VLConfig",
            auto_class="AutoModelForImageTextToText",
            processor="qwen2_vl",
            vision=(r"model\.visual\.blocks\.",),
            projector=(r"model\.visual\.merger\.",),
            language=(r"model\.language_model\.",),
            special_tokens=QWEN_TOKENS,
            config_tokens=QWEN_CONFIG_TOKENS,
        ),
        Architecture(
            name="mllama",
            model_class="MllamaForConditionalGeneration",
            config_class="MllamaConfig",
            auto_class="AutoModelForImageTextToText",
            processor="mllama",
            random_init_open_gates=("cross_attn_attn_gate", "cross_attn_mlp_gate"),
            vision=(r"model\.vision_model\.",),
            projector=(r"model\.multi_modal_projector",),
            language=(r"model\.language_model\.",),  # self- and cross-attention decoder layers
            special_tokens=dict(
                bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                       "<|image|>", "<|finetune_right_pad_id|>"],
                image="<|image|>",
            ),
            config_tokens=dict(image_token_index="image"),
        ),
        Architecture(
            name="llava_pixtral",
            model_class="LlavaForConditionalGeneration",
            config_class="LlavaConfig",
            auto_class="AutoModelForImageTextToText",
            processor="pixtral",
            vision=(r"model\.vision_tower\.",),
            projector=(r"model\.multi_modal_projector\.",),
            language=(r"model\.language_model\.",),
            special_tokens=dict(
                bos="<s>", eos="</s>", pad="<pad>",
                extra=["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
                image="[IMG]", image_break="[IMG_BREAK]", image_end="[IMG_END]",
            ),
            config_tokens=dict(image_token_index="image"),
        ),
        Architecture(
            name="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            config_class="Gemma3Config",
            auto_class="AutoModelForImageTextToText",
            processor="gemma3",
            vision=(r"model\.vision_tower\.",),
            projector=(r"model\.multi_modal_projector",),
            language=(r"model\.language_model\.",),
            special_tokens=dict(
                bos="<bos>", eos="<end_of_turn>", pad="<pad>",
                extra=["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                       "<end_of_image>", "<image_soft_token>"],
                image="<image_soft_token>", boi="<start_of_image>", eoi="<end_of_image>",
            ),
            config_tokens=dict(image_token_index="image", boi_token_index="boi", eoi_token_index="eoi"),
        ),
        Architecture(
            name="llama",
            model_class="LlamaForCausalLM",
            config_class="LlamaConfig",
            auto_class="AutoModelForCausalLM",
            processor="text",
            language=(r"model\.layers\.",),
            special_tokens=dict(
                bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                       "<|finetune_right_pad_id|>"],
            ),
        ),
        Architecture(
            name="qwen2",
            model_class="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            auto_class="AutoModelForCausalLM",
            processor="text",
            language=(r"model\.layers\.",),
            special_tokens=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                                extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        ),
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; registered: {', '.join(sorted(ARCHITECTURES))}") from None


def transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def architecture_of_model_type(model_type: str) -> Architecture | None:
    """The registered architecture whose config class has this transformers model_type (a checkpoint's
    config.json names it), or None."""
    return next((a for a in ARCHITECTURES.values() if transformers_class(a.config_class).model_type == model_type),
                None)

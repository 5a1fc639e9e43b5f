"""Tiny, randomly initialised VLMs built offline, for tests, benchmarks and the demo model.

    python -m core.tiny OUT_DIR [--family smolvlm|llava] [--seed 0]

Two architecture families prove that `load_model` is generic: SmolVLM (transformers'
Idefics3 classes, SmolVLM's chat template) and LLaVA (the TinyLLaVA family of the
MEDIQA-MAGIC paper). The tokenizer is a byte-level BPE trained in-process by the
`tokenizers` library, so nothing is downloaded. `real_dims=True` gives a SmolVLM
with SmolVLM-256M-Instruct's real dimensions (random weights) for benchmarks.
Replicas of published checkpoints (their real config, processor, chat template and
special tokens, one per supported family) are built by `core.replicas`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import torch

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for line in message['content'] %}{% if line['type'] == 'image' %}<image>\n"
    "{% elif line['type'] == 'text' %}{{ line['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Enough dermatology and chat text that the BPE learns useful merges; any text
# still tokenizes (byte-level), this only keeps sequences short.
_BASE_CORPUS = [
    "What dermatological disease is on the image and how can it be treated?",
    "Patient wants to find out what dermatological disease he suffers from.",
    "A well circumscribed brown macule with a regular border on the forearm.",
    "An irregular, asymmetric, variegated pigmented lesion; consider melanoma and refer for excision.",
    "Erythematous scaly plaques on the extensor surfaces, consistent with psoriasis.",
    "A pearly papule with telangiectasia suggests basal cell carcinoma.",
    "Honey-coloured crusts around the mouth suggest impetigo; topical antibiotics may help.",
    "Describe the morphology, the most likely diagnosis, the differential and the next steps.",
    "Patient: 54-year-old female, Fitzpatrick skin type III. Site: back. Duration: 3 weeks.",
    "red pink brown black blue yellow white round oval irregular small large multiple single scaly smooth",
    "The lesion is benign. Reassure and review if it changes. Refer to dermatology urgently.",
    "System User Assistant clinician image lesion skin rash nevus cyst wart eczema",
]
_SPECIAL = ["<pad>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_tokenizer(extra_texts: Iterable[str] = (), vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(_BASE_CORPUS) + list(extra_texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<pad>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"],
        model_max_length=8192,
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    family: str = "smolvlm",
    seed: int = 0,
    extra_texts: Iterable[str] = (),
    real_dims: bool = False,
    image_size: int = 64,
) -> Path:
    """Build, save and return the directory of a tiny random VLM + processor (offline)."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    tokenizer = build_tokenizer(extra_texts)
    if family == "smolvlm":
        model, processor = _smolvlm(tokenizer, real_dims=real_dims, image_size=image_size)
    elif family == "llava":
        model, processor = _llava(tokenizer, image_size=image_size)
    else:
        raise ValueError(f"unknown tiny family {family!r}: smolvlm or llava")
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _smolvlm(tokenizer, *, real_dims: bool, image_size: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if real_dims:  # SmolVLM-256M-Instruct's configuration (SigLIP-base/16 at 512, SmolLM2-135M)
        image_size, patch, scale = 512, 16, 4
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
        vocab = 49280  # the real vocabulary size: the embedding and lm_head costs are real
    else:
        patch, scale = 8, 2
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        vocab = len(tokenizer)
    assert (image_size // patch) % scale == 0, "image_size/patch_size must be divisible by scale_factor"
    image_seq_len = (image_size // patch) ** 2 // scale**2
    config = Idefics3Config(
        vision_config=dict(image_size=image_size, patch_size=patch, **vision),
        text_config=dict(
            model_type="llama", vocab_size=max(vocab, len(tokenizer)), max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, **text
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size * 4 if real_dims else image_size * 2},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)
    return model, processor


def _llava(tokenizer, *, image_size: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    patch = 8
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=("smolvlm", "llava"), default="smolvlm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dims", action="store_true", help="SmolVLM-256M-Instruct's dimensions, random weights")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, family=args.family, seed=args.seed, real_dims=args.real_dims))


if __name__ == "__main__":
    main()

"""Every model family we claim, proven offline on tiny replicas of the published checkpoints.

    python -m pytest -q -p no:cacheprovider tests/test_families.py

Each replica (core.replicas.build_replica) is built from tests/fixtures/families/<family>/:
the checkpoint's own config (shrunk), processor config, chat template and special tokens.
For each family: load through load_model; answer and stream; a multi-turn case with an
image in an earlier turn; several images; the safety instruction where the template
allows it; LoRA refine steps with the loss on the answer and the template's own stop
marker; batched training and evaluation with the family's own tensors; an adapter saved,
loaded and switched; a prompt longer than the context refused with a clear message.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from core.config import Settings
from core.engine import Engine
from core.errors import InputError, ModelLoadError
from core.models import load_model
from core.prompts import SAFETY_INSTRUCTION, ChatTurn
from core.replicas import FIXTURES, build_replica

from conftest import draw_lesion

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# Their processors cannot be built without torchvision (a video processor is part of them).
NEEDS_TORCHVISION = ["smolvlm2", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
FAMILIES = ["smolvlm", "llava15", "gemma3", "mllama"] + (NEEDS_TORCHVISION if HAS_TORCHVISION else [])
# The token that closes an assistant turn in each published template, which refine must train.
STOP = {"smolvlm": "<end_of_utterance>", "smolvlm2": "<end_of_utterance>", "llava15": "</s>", "gemma3": "<end_of_turn>", "mllama": "<|eot_id|>",
        "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "llava_onevision": "<|im_end|>"}


@pytest.fixture(scope="module", params=FAMILIES)
def replica(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, build_replica(family, tmp_path_factory.mktemp(family))


def _engine(path: Path, **settings) -> Engine:
    return Engine(load_model(path, device="cpu"), Settings.from_env(max_new_tokens=6, **settings))


def test_replica_keeps_the_published_files(replica):
    family, path = replica
    src = FIXTURES / family
    assert (path / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    published = json.loads((src / "config.json").read_text())
    loaded = load_model(path, device="cpu")
    assert loaded.info.model_type == published["model_type"]
    expected_processor = json.loads((src / "preprocessor_config.json").read_text())["processor_class"]
    assert type(loaded.processor).__name__ == expected_processor
    tok = loaded.processor.tokenizer
    specials = json.loads((src / "special_tokens_map.json").read_text())
    assert tok.eos_token == specials["eos_token"]
    eos = loaded.model.generation_config.eos_token_id
    stops = tok.convert_ids_to_tokens(eos if isinstance(eos, list) else [eos])
    assert STOP[family] in stops


def test_answer_stream_history_and_several_images(replica):
    family, path = replica
    engine = _engine(path)
    img, other = draw_lesion(), draw_lesion((70, 90), colour=(60, 30, 30))
    whole = engine.answer([img], "What is this lesion?")
    streamed = "".join(engine.stream([img], "What is this lesion?")).strip()
    assert whole.status == "complete" and whole.text == streamed
    one = engine.answer([img], "Compare.")
    two = engine.answer([img, other], "Compare.")
    assert len(engine.encode_prompt([ChatTurn("Compare.", None, [img, other])])[1]) == 2
    if family != "llava_onevision":  # OneVision encodes several images at base resolution only: fewer tokens than one tiled image
        assert two.prompt_tokens > one.prompt_tokens  # the second image's tokens are in the prompt
    history = [ChatTurn("What is this lesion?", "A benign nevus.", [img])]
    text, images = engine.encode_prompt([*history, ChatTurn("Has it changed?")])
    assert "A benign nevus." in text and len(images) == 1
    later = engine.answer([], "Has it changed?", history=history)
    assert later.prompt_tokens > one.prompt_tokens


def test_safety_instruction_where_the_template_allows_it(replica):
    family, path = replica
    engine = _engine(path)
    text, _ = engine.encode_prompt([ChatTurn("What is this?", None, [draw_lesion()])])
    assert text.count(SAFETY_INSTRUCTION) == 1 and "'type'" not in text
    if family == "mllama":  # its template refuses a system message beside an image: folded into the user turn
        assert not engine.supports_system
        assert "<|start_header_id|>system" not in text
        assert text.index("<|start_header_id|>user") < text.index(SAFETY_INSTRUCTION) < text.index("What is this?")
    else:
        assert engine.supports_system


def test_refine_trains_answer_and_the_templates_stop_marker_in_family_batches(replica, tmp_path):
    from accelerate import Accelerator

    from training.refine.collate import IGNORE, TrainTurn, collate, encode
    from training.refine.lora import attach_lora, save_adapter
    from training.refine.train import LoopConfig, train

    family, path = replica
    engine = _engine(path)
    tok = engine.processor.tokenizer
    img, other = draw_lesion(), draw_lesion((70, 90), colour=(60, 30, 30))
    turns = [TrainTurn("a", ("x",), "What is this lesion?", "A benign nevus.", None, "free", "expert"),
             TrainTurn("b", ("x", "y"), "Compare the two.", "Both are seborrhoeic keratoses.", None, "free", "expert")]
    feats = [encode(engine, turns[0], [img]), encode(engine, turns[1], [img, other])]
    for f, turn in zip(feats, turns):
        answer = tok.decode(f.labels[f.labels != IGNORE])
        assert answer.strip() == turn.answer + STOP[family]  # answer + the template's closing stop token, nothing else
        first = int((f.labels != IGNORE).nonzero()[0])
        assert turn.answer not in tok.decode(f.input_ids[:first])  # the prompt never holds the answer

    batch = collate(feats, tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"].sum(1).tolist() == [f.input_ids.numel() for f in feats]
    if "cross_attention_mask" in batch:  # Mllama: (batch, tokens, images, tiles), padded to 2 images
        assert batch["cross_attention_mask"].shape[:3] == (2, width, 2)
        assert batch["cross_attention_mask"][0, :, 1].sum() == 0  # the first example's missing image is masked
    if "pixel_attention_mask" in batch:  # SmolVLM: padded images marked absent
        assert batch["pixel_attention_mask"].shape[:2] == (2, 2) and not batch["pixel_attention_mask"][0, 1].any()
    if "token_type_ids" in batch:  # Gemma 3: image tokens typed 1, the answer and padding 0
        assert batch["token_type_ids"].shape == (2, width)
        assert (batch["token_type_ids"][batch["labels"] != IGNORE] == 0).all()
    if family in ("llava15", "gemma3", "llava_onevision"):  # flat: the three images one after another
        assert batch["pixel_values"].shape[0] == 3
    if "image_sizes" in batch:  # LLaVA-OneVision: tiles padded to the most any image has, sizes kept to unpad
        assert batch["image_sizes"].shape == (3, 2)
    if "image_grid_thw" in batch:  # Qwen2.5-VL, Qwen3-VL: every image's patches one after another, one grid row each
        assert batch["image_grid_thw"].shape == (3, 3)
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())

    model = attach_lora(engine.model, targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = LoopConfig(steps=6, batch_size=2, grad_accum=1, learning_rate=5e-3, warmup_ratio=0.0, weight_decay=0.0,
                     max_grad_norm=1.0, seed=0, save_steps=0, keep_checkpoints=1)
    result = train(model, feats, cfg, accelerator=Accelerator(cpu=True), pad_id=tok.pad_token_id, progress=False)
    assert result.losses[-1][1] < result.losses[0][1]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    adapter = save_adapter(model, tmp_path / "adapter")

    fresh = _engine(path)
    fresh.add_adapter("v2", adapter)
    request = [ChatTurn("What is this lesion?", None, [img]), ChatTurn("Compare the two.", None, [img, other])]
    tuned = fresh.answer_batch(request, version="v2")
    base = fresh.answer_batch(request, version="base")
    assert [a.version for a in tuned] == ["v2", "v2"] and [a.version for a in base] == ["base", "base"]
    # batched evaluation pads each family's tensors correctly: the same greedy text as one by one
    alone = [fresh.answer(r.images, r.question, version="v2").text for r in request]
    assert [a.text for a in tuned] == alone


def test_a_prompt_longer_than_the_context_is_refused_not_cut(replica):
    family, path = replica
    engine = _engine(path, max_question_chars=4000)
    long = "The lesion has grown, bled and changed colour over many weeks. " * 60
    history = [ChatTurn(long[:3900], "Noted.", [draw_lesion()]), ChatTurn(long[:3900], "Noted.")]
    with pytest.raises(InputError, match=r"tokens long with its images; the limit is 1024"):
        engine.answer([], "And now?", history=history)
    from training.errors import TrainingError
    from training.refine.collate import TrainTurn, encode

    turn = TrainTurn("long", ("x",), long * 2, "Noted.", None, "free", "expert")
    with pytest.raises(TrainingError, match=r"example long is \d+ tokens long with its images; the model reads at most 1024"):
        encode(engine, turn, [draw_lesion()])


@pytest.mark.parametrize("family", NEEDS_TORCHVISION)
def test_without_torchvision_the_message_names_what_to_install(family, tmp_path):
    if HAS_TORCHVISION:
        pytest.skip("torchvision is installed here: the replica itself runs in the family tests")
    from core.replicas import FAMILIES as SPECS
    from core.replicas import build_tokenizer

    src = FIXTURES / family
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, tmp_path / name)
    spec = SPECS[json.loads((src / "config.json").read_text())["model_type"]]
    build_tokenizer(json.loads((src / "special_tokens_map.json").read_text()), spec["extra_tokens"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, device="cpu")
    message = str(err.value)
    assert "\n" not in message and "needs torchvision" in message and "pip install torch==2.14.1 torchvision==0.29.1" in message


def test_remote_code_is_refused_unless_asked_for(tmp_path):
    shutil.copy(FIXTURES / "moondream2" / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="trust_remote_code.*off by default"):
        load_model(tmp_path, device="cpu")
    # asked for, it still cannot run here: its code lives in the hub repository, not in the config
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, device="cpu", trust_remote_code=True)
    assert "\n" not in str(err.value)


def test_gpu_loading_options_say_what_is_missing(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="4-bit loading needs a CUDA GPU"):
        load_model(tiny_model_dir, device="cpu", quantize="4bit")
    with pytest.raises(ModelLoadError, match="quantize must be 4bit"):
        load_model(tiny_model_dir, device="cpu", quantize="8bit")
    with pytest.raises(ModelLoadError, match="device_map must be auto"):
        load_model(tiny_model_dir, device="cpu", device_map="balanced")
    loaded = load_model(tiny_model_dir, device="cpu", device_map="auto")  # accelerate places it (on the CPU here)
    assert loaded.model.device.type == "cpu"


def test_real_dimension_replicas_have_the_published_parameter_counts():
    """The fixtures' configs at full size (bench.engine --family builds them) match the sizes the model cards state."""
    from core.replicas import replica_parameters

    published = {"smolvlm": 0.256e9, "smolvlm2": 0.256e9, "llava_onevision": 0.894e9, "qwen2_5_vl": 3.75e9,
                 "qwen3_vl": 4.44e9, "gemma3": 4.30e9, "llava15": 7.06e9, "mllama": 10.7e9}
    counts = {family: replica_parameters(family) for family in published}  # on the meta device: no memory, no time
    assert counts == {f: pytest.approx(n, rel=0.01) for f, n in published.items()}

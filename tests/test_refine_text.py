"""Training text and masking: exactly the engine's prompt, the answer as the target, loss on answer tokens only."""

from __future__ import annotations

from training.data.examples import Example
from training.refine.collate import CAPTION_QUESTION, IGNORE, TrainTurn, collate, encode, supervised_turns, training_text


def _img(colour=(150, 60, 40)):
    from PIL import Image

    return Image.new("RGB", (64, 64), colour)


def test_supervision_modes_build_the_documented_turns():
    syn = Example("s1", ["a.png"], "What is it?", ["Psoriasis."], caption="Pink scaly plaque.", source="synthetic-qa")
    gold = Example("g1", ["b.png"], "And this?", ["Naevus."], caption="ignored", source="expert")
    qa = supervised_turns([syn, gold], "qa")
    assert [(t.question, t.answer) for t in qa] == [("What is it?", "Psoriasis."), ("And this?", "Naevus.")]
    cap = supervised_turns([syn, gold], "caption")
    assert [(t.question, t.answer) for t in cap] == [(CAPTION_QUESTION, "Pink scaly plaque."), ("And this?", "Naevus.")]
    both = supervised_turns([syn, gold, syn], "qa+caption")  # the duplicate is dropped
    assert [(t.question, t.answer) for t in both] == [
        ("What is it?", "Psoriasis."), (CAPTION_QUESTION, "Pink scaly plaque."), ("And this?", "Naevus.")]


def test_training_text_is_engine_prompt_plus_answer_and_eos(tiny_engine):
    from core.prompts import ChatTurn, ClinicalContext

    ctx = ClinicalContext(age=54, body_site="back")
    turn = ChatTurn("What is this lesion?", None, [_img()], ctx, "mediqa_disease_treatment")
    prompt, target, images = training_text(tiny_engine, turn, "A benign naevus.")
    asked, _ = tiny_engine.encode_prompt([turn])  # what the engine sends at inference
    assert prompt == asked
    assert target == " A benign naevus.<end_of_utterance>"  # the eos is trained; the newline after it is not
    full, _ = tiny_engine.encode_prompt([ChatTurn(turn.question, "A benign naevus.", [_img()], ctx, turn.template)],
                                        add_generation_prompt=False)
    assert full.startswith(prompt + target) and full[len(prompt + target):].strip() == ""


def test_masking_covers_prompt_image_and_padding_exactly(tiny_engine):
    tok = tiny_engine.processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    short = TrainTurn("1", ("x",), "What is it?", "Naevus.", None, "free", "expert")
    long = TrainTurn("2", ("y",), "What is it?", "A much longer answer about this lesion.", {"age": 40}, "free", "expert")
    f1, f2 = encode(tiny_engine, short, [_img()]), encode(tiny_engine, long, [_img((10, 10, 10)), _img()])
    batch = collate([f1, f2], tok.pad_token_id)
    for row, (f, turn) in enumerate(((f1, short), (f2, long))):
        ids, labels, attn = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        target = tok(f" {turn.answer}<end_of_utterance>", add_special_tokens=False)["input_ids"]
        n = f.input_ids.numel()
        prompt_len = n - len(target)
        assert labels[:prompt_len].eq(IGNORE).all()  # system text, context, question, every image token
        assert labels[prompt_len:n].tolist() == target == ids[prompt_len:n].tolist()
        assert labels[n:].eq(IGNORE).all() and attn[n:].eq(0).all() and ids[n:].eq(tok.pad_token_id).all()
        assert (ids[:prompt_len] == image_id).sum() > 0 and not (labels == image_id).any()
        prompt_ids = tiny_engine.processor(text=[tiny_engine.encode_prompt(
            [__import__("training.refine.collate", fromlist=["chat_turn"]).chat_turn(turn, [_img()] * (1 if row == 0 else 2), None)])[0]],
            images=[[_img()] * (1 if row == 0 else 2)], return_tensors="pt")["input_ids"][0]
        assert ids[:prompt_len].tolist() == prompt_ids.tolist()  # the prompt tokens are those of generation
    # Image tensors: one image padded with an all-zero image so the two examples batch together.
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert batch["pixel_values"][0, 1].eq(0).all() and batch["pixel_attention_mask"][0, 1].eq(0).all()
    out = tiny_engine.model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_lora_targets_language_model_only_unless_vision(tiny_engine):
    from training.refine.lora import resolve_targets

    text = resolve_targets(tiny_engine.model, ["q_proj", "lm_head"])
    assert "lm_head" in text and all("vision" not in n for n in text)
    both = resolve_targets(tiny_engine.model, ["q_proj"], vision=True)
    assert any("vision" in n for n in both) and len(both) > len(text) - 1
    import pytest

    from training.errors import TrainingError

    with pytest.raises(TrainingError, match="no language-model Linear module named qkv_typo"):
        resolve_targets(tiny_engine.model, ["qkv_typo"])

"""Settings from the environment and flags; clinical context and templates."""

import pytest

from core.config import Settings, parse_cli
from core.errors import InputError
from core.prompts import TEMPLATES, ChatTurn, ClinicalContext, build_messages, render_user_text

from conftest import draw_lesion


def test_env_then_flags(monkeypatch, dermaloop_home):
    monkeypatch.setenv("DERMALOOP_MODEL", "/models/mine")
    monkeypatch.setenv("DERMALOOP_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("DERMALOOP_DO_SAMPLE", "true")
    s = Settings.from_env()
    assert s.home == dermaloop_home and s.model == "/models/mine" and s.max_new_tokens == 64 and s.do_sample
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("annotations.db")
    (s2,), given = parse_cli([Settings], ["--max-new-tokens", "8", "--no-do-sample", "--db", "sqlite:///x.db"], prog="x")
    assert s2.max_new_tokens == 8 and not s2.do_sample and s2.db_url == "sqlite:///x.db" and s2.model == "/models/mine"
    assert s2.generation().max_new_tokens == 8
    assert given == {"home", "model", "max_new_tokens", "do_sample", "db"}  # home: the autouse fixture's variable


def test_config_file_between_variables_and_flags(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DERMALOOP_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("DERMALOOP_DEVICE", "cpu")
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max-new-tokens: 32\ntop_p: 0.5\n")
    (s,), given = parse_cli([Settings], ["--config", str(cfg), "--top-p", "0.7"], prog="x")
    assert (s.max_new_tokens, s.top_p, s.device) == (32, 0.7, "cpu")  # file over variable, flag over file
    cfg.write_text("max_new_token: 32\n")
    with pytest.raises(InputError, match="unknown setting.*max_new_token"):
        parse_cli([Settings], ["--config", str(cfg)], prog="x")
    with pytest.raises(InputError, match="no such file"):
        parse_cli([Settings], ["--config", str(tmp_path / "nope.yaml")], prog="x")
    for argv, message in ((["--device", "tpu"], "invalid choice: 'tpu'"), (["--max-images", "0"], "--max-images must be at least 1")):
        with pytest.raises((SystemExit, InputError)) as e:
            parse_cli([Settings], argv, prog="x")
        assert message in (str(e.value) if e.type is InputError else capsys.readouterr().err)


@pytest.mark.parametrize(
    "var, value, message",
    [("DERMALOOP_MAX_NEW_TOKENS", "many", "not a valid int"), ("DERMALOOP_DEVICE", "tpu", "DERMALOOP_DEVICE must be one of"),
     ("DERMALOOP_DO_SAMPLE", "maybe", "not a valid bool"), ("DERMALOOP_MAX_IMAGES", "0", "DERMALOOP_MAX_IMAGES must be at least 1")],
)
def test_bad_settings_are_one_line_errors(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(InputError, match=message):
        Settings.from_env()


def test_context_renders_and_validates():
    ctx = ClinicalContext.from_dict({"age": "54", "sex": "female", "body_site": "back", "fitzpatrick": "III",
                                     "modality": "dermoscopic", "symptoms": "", "duration": "3 weeks"})
    assert ctx.to_dict() == {"age": 54, "sex": "female", "body_site": "back", "duration": "3 weeks",
                             "fitzpatrick": "III", "modality": "dermoscopic"}
    text = ctx.render()
    assert "54-year-old female" in text and "Fitzpatrick skin type III" in text and "Site: back." in text
    assert ClinicalContext().render() == ""
    with pytest.raises(InputError, match="unknown context"):
        ClinicalContext.from_dict({"name": "Jane"})
    for bad_age in ("old", "inf", "1e999", "nan"):
        with pytest.raises(InputError, match="age"):
            ClinicalContext.from_dict({"age": bad_age})
    with pytest.raises(InputError, match="Fitzpatrick"):
        ClinicalContext(fitzpatrick="VII")


def test_templates_are_the_papers_prompts():
    ctx = ClinicalContext(age=30)
    text = render_user_text("Itchy red patch.", ctx, "mediqa_two_questions")
    assert text.startswith("Patient wants to find out what dermatological disease he suffers from.")
    assert "Patient: 30-year-old. Itchy red patch. Answer two questions: 1." in text
    assert render_user_text("Q?", None, "mediqa_disease_treatment").endswith(
        "Q? What dermatological disease is on the image and how can it be treated?")
    assert set(TEMPLATES) == {"free", "mediqa_disease_treatment", "mediqa_two_questions"}
    with pytest.raises(InputError, match="unknown template"):
        render_user_text("Q", None, "nope")


def test_messages_keep_images_with_their_turn():
    a, b, c = draw_lesion(colour=(1, 2, 3)), draw_lesion(colour=(4, 5, 6)), draw_lesion(colour=(7, 8, 9))
    turns = [ChatTurn("first", "answer one", [a, b], ClinicalContext(age=5)), ChatTurn("second", None, [c])]
    messages, images = build_messages(turns)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert [x["type"] for x in messages[1]["content"]] == ["image", "image", "text"]
    assert [x["type"] for x in messages[3]["content"]] == ["image", "text"]
    assert images == [a, b, c]
    assert "5-year-old" in messages[1]["content"][-1]["text"]

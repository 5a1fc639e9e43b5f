"""Answers render Markdown safely: lists and emphasis stay Markdown, HTML and images never take effect.

    python -m pytest -q tests/test_demo_markdown.py
"""

from __future__ import annotations

from demo.common import model_markdown, plain


def test_answer_markdown_keeps_formatting_and_neutralises_html_and_images():
    answer = ("**Likely** a naevus:\n- benign\n- follow up\n<script>alert(1)</script>"
              "<img src=x onerror=alert(2)> ![pixel](http://192.0.2.7/p.png)")
    shown = model_markdown(answer)
    assert "**Likely**" in shown and "\n- benign" in shown  # Markdown still renders
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert "<img" not in shown and "&lt;img src=x onerror=alert(2)&gt;" in shown
    assert "![pixel]" not in shown and "!\\[pixel]" in shown  # an image becomes text: nothing loads


def test_a_persons_text_is_shown_as_typed():
    shown = plain("**not bold** <b>x</b> [link](javascript:alert(1))")
    assert "<b>" not in shown and "\\*\\*not bold\\*\\*" in shown and "\\[link\\]" in shown

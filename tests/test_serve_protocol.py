"""The parts of raytp.serve that need no server: a completion's text as its ids arrive
(stop strings across ids, nothing of a possible stop string or of an unfinished
character handed out early), and the checks of a completions request's fields."""

import pytest

pytest.importorskip("ray.serve")

from raytp.serve.protocol import ApiError, parse_completion  # noqa: E402
from raytp.serve.text import CompletionText  # noqa: E402


class Chars:
    """A tokenizer whose ids are characters, but for id 0: the first half of "é", which
    the next id (whatever it is) completes; alone it decodes as U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        text, half = "", False
        for i in ids:
            if i == 0:
                half = True
                continue
            text += "é" if half else chr(i)
            half = False
        return text + ("\ufffd" if half else "")


def _feed(text: CompletionText, chars: str) -> list[str]:
    return [text.add(ord(c)) for c in chars]


def test_stop_strings_across_ids_are_cut_and_never_handed_out():
    text = CompletionText(Chars(), ("xyz", "q"))
    pieces = _feed(text, "abxy")
    assert "".join(pieces) == "ab"  # "xy" may still become "xyz"
    pieces += _feed(text, "z")
    assert text.stopped and "".join(pieces) + text.finish() == "ab" and text.text == "ab"
    plain = CompletionText(Chars(), ("xyz",))
    pieces = _feed(plain, "abxyw")
    assert not plain.stopped and "".join(pieces) + plain.finish() == "abxyw"


def test_an_unfinished_character_waits_for_its_other_half():
    text = CompletionText(Chars(), ())
    assert text.add(ord("a")) == "a" and text.add(0) == ""
    assert text.add(1) == "é" and text.add(ord("-")) == "-" and text.finish() == ""
    assert CompletionText(None, ("x",)).add(5) == ""  # no tokenizer: ids only


def test_request_fields_are_checked():
    request = parse_completion({"prompt": "hi", "stop": ["\n", 7], "stop_token_ids": [9], "top_p": 1,
                                "top_k": -1, "n": 1, "echo": False, "logit_bias": {}, "suffix": ""})
    assert request.stop == ("\n",) and request.stop_ids == (7, 9) and request.max_tokens == 16
    assert request.top_p is None and request.top_k is None and request.temperature == 1.0
    assert parse_completion({"prompt": [[1, 2], "x"]}).prompts == ((1, 2), "x")
    for body, field, message in [
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "must be a int, got bool"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p=0 must be in (0, 1]"),
        ({"prompt": "x", "temperature": 2.5}, "temperature", "must be in [0, 2]"),
        ({"prompt": "x", "stop": [1.5]}, "stop", "strings and token ids"),
        ({"prompt": "x", "stream": "yes"}, "stream", "must be a bool"),
        ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options", "true or false"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported by raytp"),
        ({"prompt": [[1], [True]]}, "prompt", "list of token ids"),
        ({}, "prompt", "prompt is required"),
    ]:
        with pytest.raises(ApiError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
            parse_completion(body)
        assert e.value.status == 400 and e.value.body()["error"]["param"] == field

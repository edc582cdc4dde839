import pytest
import torch

from microspec.prompts import chat_rows, encode_chat, left_pad


class _PlainTokenizer:             # no chat template: text is encoded as is
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) for c in text]


class _ChatTokenizer(_PlainTokenizer):
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<{messages[0]['content']}>"


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [9]], pad=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("rows", [[], [[1], []]])
def test_left_pad_rejects_empty_input(rows):
    with pytest.raises(ValueError, match="empty"):
        left_pad(rows)


def test_chat_template_is_applied_only_when_present():
    assert chat_rows(_PlainTokenizer(), ["ab"]) == [[97, 98]]
    assert chat_rows(_ChatTokenizer(), ["ab"]) == [[60, 97, 98, 62]]
    ids, mask = encode_chat(_ChatTokenizer(), ["ab", "a"])
    assert ids.shape == mask.shape == (2, 4) and mask.sum().item() == 7

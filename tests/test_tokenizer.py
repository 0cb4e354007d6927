"""Tokenizer and chat-template tests: parity with transformers on locally built tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax.data import chat as chat_lib
from rlhf_jax.data.tokenizer import (CharTokenizer, HFTokenizer, Tokenizer, check_vocab_fits,
                                     pad_sequences)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")

# Uses {% generation %}, namespace, tojson and loop controls.
GENERATION = (
    "{% set ns = namespace(n=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{{ '<!-- ' + ({'turns': ns.n} | tojson) + ' -->' }}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<pad>"]

CONVS = [
    [{"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "2 + 3 = 5"}],
    [{"role": "system", "content": "You are terse. "},
     {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "and 7*6?"},
     {"role": "assistant", "content": " 42 "}],
    [{"role": "user", "content": "Grüße ☃"}, {"role": "assistant", "content": "héllo ✓ ok"}],
]


def _build(tmp_path, template, *, bos, eos, write_config_by_hand=False):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["What is 2+3? 2 + 3 = 5", "hello there, you are terse", "assistant user system"]
  tok.train_from_iterator(corpus * 5, trainer=trainer)
  path = tmp_path / "tok"
  if write_config_by_hand:
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": bos, "special": True}, "eos_token": eos,
        "pad_token": "<pad>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
  else:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                                eos_token=eos, pad_token="<pad>")
    fast.chat_template = template
    fast.save_pretrained(str(path))
  hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
  return hf, HFTokenizer.from_dir(path)


@pytest.mark.parametrize("template,bos,eos,by_hand", [
    (CHATML, "<|im_start|>", "<|im_end|>", False),
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", False),
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    (GENERATION, "<|im_start|>", "<|im_end|>", True),
])
def test_chat_template_matches_transformers(tmp_path, template, bos, eos, by_hand):
  hf, ours = _build(tmp_path, template, bos=bos, eos=eos, write_config_by_hand=by_hand)
  assert isinstance(ours, Tokenizer)
  assert ours.chat_template == template
  assert ours.vocab_size == len(hf)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
  for conv in CONVS:
    for gen in (False, True):
      expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
      got = ours.apply_chat_template(conv, add_generation_prompt=gen)
      assert got == expected
      assert ours.encode(got) == hf(expected, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode("hello 2+3")) == "hello 2+3"


def test_generation_mask_matches_transformers(tmp_path):
  hf, ours = _build(tmp_path, GENERATION, bos="<|im_start|>", eos="<|im_end|>",
                    write_config_by_hand=True)
  for conv in CONVS:
    out = hf.apply_chat_template(conv, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, mask = ours.encode_chat(conv)
    assert ids == list(out["input_ids"])
    assert mask == list(out["assistant_masks"])
    assert sum(mask) > 0


def test_assistant_mask_without_generation_blocks(tmp_path):
  _, ours = _build(tmp_path, CHATML, bos="<|im_start|>", eos="<|im_end|>")
  conv = CONVS[1]
  ids, mask = ours.encode_chat(conv)
  text = ours.apply_chat_template(conv)
  # Independent expectation: the masked tokens decode to each assistant reply + "<|im_end|>\n".
  masked = [i for i, m in zip(ids, mask) if m]
  assert ours.decode(masked, skip_special_tokens=False) == "hi<|im_end|>\n 42 <|im_end|>\n"
  assert ours.decode(ids, skip_special_tokens=False) == text
  # The user/system turns contribute no masked token.
  assert mask[0] == 0 and mask[-1] == 1


def test_prefix_inconsistent_template_raises():
  # Renders the last message specially, so prefix renders are not prefixes of the full one.
  tmpl = ("{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}|"
          "{% endfor %}")
  with pytest.raises(ValueError, match="generation"):
    chat_lib.render_chat(tmpl, [{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"}])


def test_raise_exception_and_bad_messages():
  import jinja2  # pylint: disable=import-outside-toplevel
  with pytest.raises(jinja2.exceptions.TemplateError, match="Only user and assistant"):
    chat_lib.render_chat(LLAMA3, [{"role": "tool", "content": "x"}], special_tokens={
        "bos_token": "<s>"})
  with pytest.raises(ValueError, match=r"messages\[1\]: missing field 'content'"):
    chat_lib.render_chat(CHATML, [{"role": "user", "content": "x"}, {"role": "assistant"}])
  with pytest.raises(ValueError, match="non-empty list"):
    chat_lib.render_chat(CHATML, [])


def test_char_tokenizer_roundtrip_and_protocol():
  tok = CharTokenizer(chat_template=CHATML.replace("<|im_start|>", "<bos>").replace(
      "<|im_end|>", "<eos>"))
  assert isinstance(tok, Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  text = "12+345=357 abc XYZ (7*6)/2"
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(text) + 2
  assert max(ids) < tok.vocab_size and 0 not in ids
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text + "<eos>"
  with pytest.raises(ValueError, match="'€'"):
    tok.encode("5€")
  ids, mask = tok.encode_chat([{"role": "user", "content": "1+1="},
                               {"role": "assistant", "content": "2"}])
  assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
      "2<eos>\n"


def test_encode_batch_padding_sides():
  tok = CharTokenizer()
  out = tok.encode_batch(["ab", "abcd"], padding_side="left")
  np.testing.assert_array_equal(out["attention_mask"], [[0, 0, 1, 1], [1, 1, 1, 1]])
  assert out["input_ids"][0, 0] == tok.pad_id and tok.decode(out["input_ids"][0]) == "ab"
  out = tok.encode_batch(["ab", "abcd"], padding_side="right", max_length=5)
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
  out = tok.encode_batch(["abcd"], padding_side="left", max_length=2, truncation=True)
  assert tok.decode(out["input_ids"][0]) == "cd"
  with pytest.raises(ValueError, match="length=2"):
    tok.encode_batch(["abcd"], max_length=2)
  with pytest.raises(ValueError, match="padding_side"):
    pad_sequences([[1]], length=2, pad_id=0, padding_side="middle")


def test_check_vocab_fits():
  tok = CharTokenizer()
  check_vocab_fits(tok, tok.vocab_size)
  check_vocab_fits(tok, 1000)
  with pytest.raises(ValueError, match=rf"vocab_size={tok.vocab_size} exceeds .*vocab_size=10"):
    check_vocab_fits(tok, 10)


def test_hf_preference_example_prompt_prefix(tmp_path):
  from rlhf_jax.data import batching  # pylint: disable=import-outside-toplevel
  _, ours = _build(tmp_path, CHATML, bos="<|im_start|>", eos="<|im_end|>")
  prompt = CONVS[1][:4]
  fn = batching.make_preference_example_fn(ours, max_prompt_length=200, max_length=256)
  ex = fn({"prompt": prompt, "chosen": "yes 42", "rejected": "no"}, 0)
  prompt_ids = ours.encode(ours.apply_chat_template(prompt, add_generation_prompt=True))
  n = len(prompt_ids)
  for side, text in (("chosen", "yes 42"), ("rejected", "no")):
    assert ex[f"{side}_ids"][:n] == prompt_ids
    assert ex[f"{side}_loss_mask"][:n] == [0] * n
    resp = ex[f"{side}_ids"][n:]
    assert ex[f"{side}_loss_mask"][n:] == [1] * len(resp)
    assert ours.decode(resp, skip_special_tokens=False) == text + "<|im_end|>\n"

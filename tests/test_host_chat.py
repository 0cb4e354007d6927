"""Host tool results rendered through the tokenizer's chat template (`tool` role): the token
stream of prompt, model turn and observation equals the template's rendering of the
conversation; tokenizers without a template (and `chat_roles="off"`) keep plain text."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax import envs
from rlhf_jax.data.tokenizer import CharTokenizer
from rlhf_jax.envs import host

# A ChatML-like template over the character tokenizer's alphabet; "<eos>" ends every turn.
TEMPLATE = ("{% for m in messages %}{{ '#' + m['role'] + ':\n' + m['content'] + '<eos>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '#assistant:\n' }}{% endif %}")
NO_TOOL = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
           "{{ raise_exception('no tool role') }}{% endif %}{{ m['content'] }}{% endfor %}")


def _render(tok, messages):
  return tok.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("ended_with_eos", [True, False])
def test_prompt_turn_and_observation_equal_the_templates_rendering(ended_with_eos):
  tok = CharTokenizer(chat_template=TEMPLATE)
  frame = host.tool_turn_frame(tok)
  user, action, result = "what is 6*7?", "<calc>6*7</calc>", "42"
  stream = (_render(tok, [{"role": "user", "content": user}]) + action
            + ("<eos>" if ended_with_eos else "")
            + host.tool_observation_text(frame, result, ended_with_eos=ended_with_eos))
  assert stream == _render(tok, [{"role": "user", "content": user},
                                 {"role": "assistant", "content": action},
                                 {"role": "tool", "content": result}])


def test_without_a_template_or_with_chat_roles_off_the_result_is_plain():
  assert host.tool_turn_frame(CharTokenizer()) is None
  assert host.tool_observation_text(None, "42", ended_with_eos=True) == "42"
  env = host.make_host_env(lambda call: ("42", 0.0, False), CharTokenizer(chat_template=TEMPLATE),
                           obs_tokens=8, chat_roles="off")
  assert env._frame is None  # pylint: disable=protected-access


def test_host_env_observation_ids_are_the_tool_message():
  tok = CharTokenizer(chat_template=TEMPLATE)
  env, _ = envs.make("host", tok, tool=lambda call: host.ToolResult(str(len(call.action))),
                     obs_tokens=40)
  action = tok.encode("abc") + [tok.eos_id]
  ids = np.asarray([action + [0, 0], tok.encode("xy") + [0, 0, 0, 0]], np.int32)
  mask = np.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  obs, obs_mask, _, _ = env.host_step((), np.full((2, 2), 5, np.int32), np.ones((2, 2), bool),
                                      ids, mask, np.zeros(2, np.int32))
  text = [tok.decode(list(obs[r][obs_mask[r]]), skip_special_tokens=False) for r in range(2)]
  assert text[0] == "\n#tool:\n3<eos>\n#assistant:\n"           # the turn ended with EOS
  assert text[1] == "<eos>\n#tool:\n2<eos>\n#assistant:\n"      # ended by a stop string


def test_a_template_without_a_tool_role_is_named():
  with pytest.raises(envs.EnvSpecError, match="cannot render a 'tool' message .*chat_roles='off'"):
    host.make_host_env(lambda call: ("", 0.0, False), CharTokenizer(chat_template=NO_TOOL),
                       obs_tokens=8)
  with pytest.raises(envs.EnvSpecError, match="chat_roles must be one of"):
    host.make_host_env(lambda call: ("", 0.0, False), CharTokenizer(), obs_tokens=8,
                       chat_roles="yes")

"""The default demo: SFT warm-up, then GRPO on synthetic addition, on a tiny Llama.

    python -m rlhf_jax.demo [--config.train.steps=...]

Prints held-out accuracy (greedy decoding, exact answer) before and after GRPO
and writes metrics, TensorBoard events and `reward_curve.png` to the workdir.
The same config is `experiments/grpo_arithmetic.py`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from rlhf_jax import config_utils


def rl_block(**overrides) -> dict:
  """The `config.rl` block of the demo (GRPO), every `RLSettings` key a command line is
  likely to set present (so `--config.rl.<key>=...` can override it)."""
  rl = dict(group_size=8, advantage="grpo", surrogate="ppo_clip", kl_coef=0.0,
            aggregation="token_mean", epochs=1, num_minibatches=1, micro_batches=1,
            reward_weights=(), constraint_thresholds=(), constraint_equality=(),
            constraint_lr=0.1, ref_update_every=0, dynamic_sampling=0,
            ref_ema_decay=config_dict.placeholder(float), advantage_kwargs={},
            surrogate_kwargs={}, kl_in_reward=False, objective="policy_gradient",
            preference_loss=config_dict.placeholder(str), preference_loss_kwargs={},
            pairs="best_worst", rso_beta=0.5, preference_temperature=1.0, iterate_every=0,
            mixture_beta=0.125, token_reward_prompts=(), sample_filter={},
            adaptive_sampling={}, knapsack={})
  rl.update(overrides)
  return rl


ARGS = ("runlocal",)


def get_config(arg=None):
  """Demo config; `arg="runlocal"` shrinks it to a seconds-long smoke run.

  Any other argument is a ValueError listing the known ones (a misspelt `:runlocal`
  would otherwise start the full run).
  """
  if arg not in (None, "", *ARGS):
    raise ValueError(f"config arg {arg!r} is unknown; use one of {list(ARGS)} or none "
                     "(the full run)")
  c = ml_collections.ConfigDict()
  c.paradigm = "online"
  c.seed = 0
  c.seeds = 1  # N > 1: N runs (seeds seed .. seed + N - 1) in one vmapped program
  c.workdir = "runs/demo"
  c.progress = True
  c.tokenizer = "char"
  c.model = dict(hf_config=dict(
      model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=192, max_position_embeddings=64,
      tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5))
  c.task = dict(name="arithmetic", num_digits=2, op="+")
  c.data = dict(max_prompt_length=6, train_size=4000, eval_size=200)
  c.sft = dict(steps=220, batch_size=64, optim=dict(learning_rate=3e-3, warmup_steps=10))
  c.sampling = dict(max_new_tokens=4, temperature=1.0, top_k=None, top_p=None)
  c.rewards = ("exact_match",)
  c.reward_shaping = ()  # transforms of the rewards, e.g. ("spo_win_rate",); docs/rewards.md
  c.rl = rl_block()
  c.optim = dict(learning_rate=1e-3, max_grad_norm=1.0)
  c.train = dict(steps=300, prompts_per_step=32, eval_every=50)
  c.export_hf = False  # True: write the trained policy to <workdir>/hf_model
  config_utils.optional_blocks(c, "value", "mesh", "distributed", "env")
  if arg == "runlocal":
    c.sft.steps, c.train.steps, c.data.eval_size, c.train.eval_every = 20, 3, 16, 0
    c.progress = False
  return c


def main(argv=None) -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def make_main():
    flag = config_flags.DEFINE_config_dict("config", get_config())

    def run(argv):
      del argv
      from rlhf_jax.train import online_loop  # pylint: disable=g-import-not-at-top
      s = online_loop.train(flag.value)
      print(f"\nheld-out accuracy before GRPO: {s['accuracy_before']:.3f}")
      print(f"held-out accuracy after GRPO:  {s['accuracy_after']:.3f}  "
            f"({100 * (s['accuracy_after'] - s['accuracy_before']):+.1f} points)")
      print(f"first (compiling) step: {s['first_step_seconds']:.1f} s; steady step: "
            f"{s['steady_step_seconds']:.3f} s; total {s['total_seconds']:.0f} s")
      print(f"reward curve: {s['plot']}")
    return run

  def schema_of(config):
    from rlhf_jax.train import config_schema  # pylint: disable=g-import-not-at-top
    return config_schema.schema_of(config)
  config_utils.run_app(make_main, argv, schema_of=schema_of)


if __name__ == "__main__":
  main()

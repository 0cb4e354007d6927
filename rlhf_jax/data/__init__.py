"""Tokenizers, chat templates, datasets and synthetic tasks."""

from rlhf_jax.data.batching import (TRUNCATION_POLICIES, Batcher, Packer, SkipExample,
                                    collate_preference, collate_prompts, collate_sft,
                                    make_preference_example_fn, make_prompt_example_fn,
                                    make_sft_example_fn, segment_attention_mask)
from rlhf_jax.data.chat import render_chat, render_chat_text
from rlhf_jax.data.jsonl import FORMATS, DataFormatError, JsonlDataset, load_jsonl, write_jsonl
from rlhf_jax.data.pipeline import (DataIterator, grain_batches, precheck, preference_batches,
                                    prompt_batches, sft_batches)
from rlhf_jax.data import prompt_data
from rlhf_jax.data.prompt_data import (DATASET_TASKS, PromptData, is_dataset_task,
                                       load_prompt_data, prompt_arrays)
from rlhf_jax.data.synthetic import (ArithmeticTask, CountdownTask, PreferenceTask, TASKS,
                                     make_task)
from rlhf_jax.data.tokenizer import (CharTokenizer, HFTokenizer, Tokenizer, check_vocab_fits,
                                     pad_sequences)

# `tfds_source` is imported on demand (it imports tensorflow_datasets). `prompt_batches` here is
# the pipeline's; the dataset-task one is `prompt_data.prompt_batches`.

"""The plumbing of tiny-rlhf: what util.py (the pipeline a learner reads) imports, and nothing
that imports util. Imports run one way: notebooks -> util -> rlhf (tests/test_layout.py).

  config.py       Config: every knob, each with why; the presets smoke, tiny, opt; get_config,
                  load_config; resolve_precision. Read it first to see what can be turned
  checks.py       the errors of a user's input (ConfigError, DataError); a Config's fields checked
  sql_data.py     the synthetic text-to-SQL preference set, the SQL sandbox, the gold metric
  data_files.py   data files and hub datasets read; the Config's data sources; the validation
                  split; leakage
  runtime.py      device and processes (accelerate), seeds, Colab's set-up, the hub probe,
                  progress bars; it imports neither torch nor numpy (Colab's first cell needs it)
  model_files.py  models and the tokenizer built, downloaded, loaded ready to train, checked
  encoding.py     text to token ids and padded batches; the rows that fit the token limits
  training.py     around every loss: batches, micro-batches, AdamW, fp16 loss scaling, the step
  saving.py       atomic saves, JSON and the run record in logs/, PPO's checkpoint files
  stopping.py     a stage stopped cleanly on Ctrl-C, SIGTERM, a NaN or out-of-memory
  plotting.py     training curves; a function's source shown in a notebook
  archive.py      a finished model/ packed into one file and unpacked, checked (a room skips ahead)

This file defines nothing and imports nothing: `from rlhf import runtime` loads runtime alone.
"""

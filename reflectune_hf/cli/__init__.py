"""The `reflectune` command (`main`) and its jobs as plain Python (`jobs`: recycle, reflect, score,
select, estimate, push; `sft_job`, `tuna_job`, `eval_job`; `score_job`, scoring on many processes),
configured by the dataclasses of `configs` and read from the command line by `arguments`. The
repository's `scripts/*.py` are thin wrappers around these jobs. Nothing in the library imports
this package."""

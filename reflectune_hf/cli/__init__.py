"""The `reflectune` command (`main`) and its jobs as plain Python (`jobs`: recycle, reflect, score,
select, estimate, push; `eval_job`), configured by the dataclasses of `configs`. Nothing in the
library imports this package."""

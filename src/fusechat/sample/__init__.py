"""The sample stage: source models answer the prompts (vLLM or transformers), in resumable chunks."""

from fusechat.sample.stage import SAMPLES_SCHEMA, run_sample

__all__ = ["SAMPLES_SCHEMA", "run_sample"]

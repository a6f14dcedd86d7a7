"""The score store: judgements kept across runs under a key of the prompt's tokens, the model's
fingerprint and the settings that change a score, so that a later run can reuse a judgement
instead of generating the reasoning again; and its `rank1-batch store` commands."""

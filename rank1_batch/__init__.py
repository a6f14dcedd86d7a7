"""rank1-batch: batch reranking with Rank1 reasoning rerankers on Ray Data and vLLM.

The top-level modules are what every part shares: `config` (the one typed job configuration),
`schema` (the Arrow schemas of inputs and outputs), `cli` and `cli_options` (the command line).
The packages are named for what they hold: `model` (prompts, scores and the vLLM engines),
`run` (one run, from the driver to the engine actors), `output` (an output directory's own
machinery), `store` (the score store shared across runs), `ir` (TREC inputs, evaluation and
relevance labels) and `cluster` (connecting to, sizing and submitting to Ray clusters).
"""

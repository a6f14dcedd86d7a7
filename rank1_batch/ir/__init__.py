"""Information retrieval around a run: turning TREC runs, topics and corpora or RankLLM files into
input shards, evaluating rankings against qrels, measuring how relevance labels agree with human
judgments, exporting labels and reasoning as training data, and the report of an output."""

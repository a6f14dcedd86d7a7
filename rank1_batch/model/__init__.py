"""What a model does with one pair, free of Ray: the Rank1 prompt and its tokens, the judgement
read from the answer's log-probabilities, the scorers (Rank1 and the cross-encoder), and the vLLM
engines that run them, with their statistics. Nothing here imports the run or the output."""

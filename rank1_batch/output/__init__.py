"""An output directory's own machinery, free of Ray Data and vLLM: storage on any fsspec URL with
conditional writes, the directory's layout, the commit records that make each batch's files count
exactly once, the lease that keeps two runs apart, the checkpoint a resume reads, the key index of
done pairs, and compaction. Everything that reads an output (the run, the store, `ir`) reads it
through here."""

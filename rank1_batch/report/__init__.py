"""The report of an output (`rank1-batch report`): its figures and markdown, a section a function
(`summary`), and the plots beside them (`plots`): scores, outcomes, reasoning lengths, rank
movement, agreement with qrels and the queue of pairs worth a person's review. It reads outputs
and qrels through `output` and `ir`, and nothing imports it but the command line."""

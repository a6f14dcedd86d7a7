"""People review a run's uncertain labels in Label Studio, and their decisions come back as qrels:
`review export` writes Label Studio tasks of a run's pairs (the least certain first, or those
whose label disagrees with qrels) with the model's judgement as a prediction, beside the labeling
configuration to create the project from; `review import` reads Label Studio's JSON export of the
annotated tasks and writes the reviewers' decisions (each pair's majority) as TREC qrels with
their provenance, and says how far the reviewers agreed with the model. `scored` reads a run and
its scale of choices; `tasks` and `decisions` are pure; `commands` holds the click group.
"""

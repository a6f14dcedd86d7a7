"""The names of what an output directory holds: each directory and file a run (or `report`)
writes under its output, in one place, so that every reader and the run agree on them."""

MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
LEASE_FILE = "_lease.json"
# Which batches were in an engine when it died (see run/engine_watch.py), kept across restarts.
DEATHS_DIR = "_engine_deaths"
# The cross-encoder's run, inside a cascade's output.
CASCADE_DIR = "cascade"
# Everything a run (and `report`) may write under its output: what --overwrite may remove.
LAYOUT = ("scores", "traces", "labels", "unscored", "rejects", "errors", DEATHS_DIR, "ranked", "report", "run.trec",
          CASCADE_DIR, MANIFEST, JOB_FILE)

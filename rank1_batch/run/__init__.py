"""One run, from the driver to the engine actors: the pipeline that wires Ray Data together, the
input inspection, the prepare and score stages that Ray Data calls on its workers, the driver's
follow loop, the drain on SIGTERM or a lost lease, the cascade's first stage, and the work that
finishes a run (ranking and the manifest). It is the only package that imports Ray Data."""

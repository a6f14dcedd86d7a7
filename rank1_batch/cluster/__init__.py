"""Ray clusters: connecting to one (or starting the embedded local Ray), sizing the actor pool to
the cluster's resources, and submitting, following and stopping jobs through the Ray Jobs API."""

"""The caption engine (scheduler + engine); VERSION covers both (and the decoder numerics they run)."""

# Bumped whenever this stage's output can change for the same input: it is part of the run
# fingerprint, so a run dir never mixes rows from before and after such a change.
VERSION = 1

"""The `pipeline` command line (cli/app.py)."""

import os

# Before anything imports torch (libgomp reads this once, when it loads): model threads that
# finish a parallel region sleep instead of spinning. The default (spin ~300k iterations) steals
# the cores from the preprocessing workers that run beside the model, and under such contention
# every small parallel op waits for a descheduled spinner. Measured on the 2-core AMD EPYC Zen 3
# (AVX2), Bunny full-size fp32, one decode step, median of 7: with one busy process beside it
# 338 -> 217 ms (B=1) and 943 -> 576 ms (B=8); on a quiet machine equal within noise
# (139-153 vs 135-170 ms, B=1). A user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

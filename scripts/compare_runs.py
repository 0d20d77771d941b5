"""`python scripts/compare_runs.py RUN_A RUN_B ... [--stage S] [--out compare.png]`: the same as
`python -m jaxllm.compare` (a table of final val loss, tokens, wall time, tokens/s; a PNG of the loss curves
against tokens and wall-clock time), for those who look in scripts/ first."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository's jaxllm, installed or not

from jaxllm import compare  # noqa: E402

if __name__ == "__main__":
    sys.exit(compare.main())

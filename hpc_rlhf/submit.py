"""`python -m hpc_rlhf.submit ...`: the user-facing launcher (see hpc_rlhf/launch/submit.py)."""
import sys

from hpc_rlhf.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())

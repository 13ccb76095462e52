"""Training entry: `accelerate launch [--multi_gpu] train_low_mem.py train --data DIR ...`.

Only parses and delegates: flags and dispatch live in `trainer_low_mem.cli`, the loop in
`trainer_low_mem.loop`. Exit codes: 0 done, 2 configuration/data/checkpoint error, 3 memory
limit, 4 training diverged (the last saved state kept), 130 stopped by SIGINT and 143 stopped by
SIGTERM (both after saving the training state).
"""

import sys

from trainer_low_mem.cli import main

if __name__ == "__main__":
    sys.exit(main())

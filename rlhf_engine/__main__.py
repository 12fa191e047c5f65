"""`python -m rlhf_engine ...` (what torchrun runs on each rank: `torchrun ... -m rlhf_engine ppo ...`)."""

import sys

from rlhf_engine.cli import main

sys.exit(main())

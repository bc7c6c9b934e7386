"""``python -m shards.synth``: the timed learnability self-check (``shards.synth.difficulty.main``)."""
from shards.synth.difficulty import main

main()

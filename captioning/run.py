"""CLI of the captioning job: `python captioning/run.py --input OUT --model PATH_OR_ID --tokenizer T5PATH …`.

Runs in-process (Ray started locally) or under
`ray job submit --working-dir . -- python captioning/run.py …`. A thin wrapper: the flags and the job
live in the installed package (`captioning.cli`, `captioning.pipeline`), so no path tricks are needed.
"""

from captioning.cli import main

if __name__ == "__main__":
    main()

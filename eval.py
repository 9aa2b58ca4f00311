"""Evaluate checkpoints at unseen seeds: `python eval.py CKPT_OR_DIR... [--episodes 50] ...` (see `--help`)."""

from toolkit.eval import main

if __name__ == "__main__":
    main()

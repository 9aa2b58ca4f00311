"""Dataset formats: readers (and writers where marked) between other tools' layouts and our episode files.

Every reader is a class built from a path (plus options) with ``env_args``, ``episode_names()`` and
``read_episode(name) -> Episode``; a bad episode raises ``ToolkitError`` naming the file and the episode,
so ``python -m toolkit.validate`` can list every problem. ``python -m toolkit.convert`` turns any
readable format into ours and ours into the writable ones.
"""

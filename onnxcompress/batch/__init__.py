"""``batch``: many models, each into its own output in one folder; a model that fails is
reported and the rest go on; a model an earlier run converted the same way is skipped.

``core`` one model (its task, fingerprint, conversion, resume check) and the summary;
``manifest`` per-model settings from a JSONL or CSV file; ``local`` and ``ray_executor`` run
the tasks (worker processes of this machine, or Ray tasks); ``driver`` ties them together."""

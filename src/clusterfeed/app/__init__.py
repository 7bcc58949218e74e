"""How the pipeline runs: its units of work, the sequences made of them, and what runs
those (the in-process scheduler of ``clusterfeed run``, or task workers on PostgreSQL)."""

"""App: the service that runs the pipeline's sequences, and what runs the service.

``service`` wires the edges (network, store, transport, clock) to the pure stages;
``units`` are its units of work and ``sequences`` the sequences made of them, written
once; ``queries`` and ``commands`` are what the CLI and the web app read and change,
so they never hold the store. ``schedule`` runs the sequences on their timetable in
one process (``clusterfeed run``), ``workers`` as tasks of many processes on
PostgreSQL (``clusterfeed worker`` and ``clusterfeed scheduler``); ``lifeline`` keeps
worker processes from outliving their parent, ``health`` decides which feeds the
operator must hear about, ``scaffold`` writes a new config folder (``clusterfeed init``).
"""

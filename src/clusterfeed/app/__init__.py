"""App: the service that runs the pipeline's sequences, and what runs the service.

``service`` wires the edges (network, store, transport, clock) to the pure stages,
``schedule`` runs it on its timetable, ``lifeline`` keeps worker processes from
outliving their parent, ``health`` decides which feeds the operator must hear about,
``scaffold`` writes a new config folder (``clusterfeed init``).
"""

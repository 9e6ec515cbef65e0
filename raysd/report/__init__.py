"""What a search found, as tables, documents and pictures; ``raysd.leaderboard`` runs it over an experiment.

- ``experiment``: reading an experiment folder into typed trials;
- ``board``: figures of a score table, ranking, the best model of each family;
- ``ensembles``: candidate ensembles, the choice among them, the ``ensemble.json`` document;
- ``unlabelled``: anomaly reports (strangest clips) for unlabelled data and new recordings;
- ``markdown``: tables and ``summary.md``;
- ``plots``: every picture and the one helper that saves them.
"""

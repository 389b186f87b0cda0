"""The offline tools: they read a journal or a trace, never a live daemon.

- ``replay``: a trace judged by the real policy, decision by decision (`governor replay`);
- ``trace``: the trace formats (JSON Lines, CSV) and their parsing;
- ``export``: a run's journal as such a trace (`governor audit export`);
- ``audit_plot``: a run's losses, decisions and timelines drawn from its journal (`governor audit plot`).
"""

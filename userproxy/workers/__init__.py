"""``--workers N``: one control-plane parent, N data-plane worker processes (docs/workers.md).

``supervisor.py`` is the parent: it owns the one source (the API watch or the manifest
reader), keeps the objects it decoded (``forwarder.py``) and sends them to every worker over
a socket pair (``channel.py``); it restarts a worker that dies and serves the merged
metrics, health and status (``merge.py``, ``admin.py``).  ``child.py`` is a worker: an
ordinary ``Proxy`` fed from the parent, its listening sockets opened with SO_REUSEPORT.
"""

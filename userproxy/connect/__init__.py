"""``userproxy connect``: a cluster's Services on a developer's machine (issue 16).

Built so far: ``portforward``, reaching a pod's port through the API server's
port-forward WebSocket.  The command itself (local addresses, names, the relay and the
watch) is not built yet.
"""

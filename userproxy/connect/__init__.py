"""``userproxy connect``: a cluster's Services on a developer's machine (issue 16).

Built so far, each with its tests (tests/connect/):

- ``portforward``: a pod's port through the API server's port-forward WebSocket;
- ``relay``: one local connection relayed through such a port-forward (a Protocol);
- ``addresses``: a stable local address per Service;
- ``hosts_file``: the managed block of a hosts file;
- ``dns``: the DNS responder (UDP and TCP) for the Services' names.

The pod behind each endpoint (the slice's ``targetRef``) is kept in the model
(``SliceEndpoint.pod``, ``Endpoint.pod``) for the port-forward.

Not built yet: the command itself (the watch of the chosen namespaces, a listener per
Service port choosing a ready pod per connection, the summary), and its docs.
"""

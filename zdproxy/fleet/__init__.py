"""Fleet mode's foundation: the shared desired state of several zdproxy members kept in
a coordination store (etcd).

store.py is the seam, the `Store` Protocol and its values; etcd.py implements it on
etcd's v3 JSON gateway (gateway.py); election.py elects one leader over it. This package
imports nothing of the data plane, the admin API or the control plane (`make contracts`
checks it): the control plane builds on it. docs/fleet.md says what it promises.
"""

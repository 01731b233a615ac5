"""lepton-edge's own target plug-ins (installed as `lepton_edge_targets`).

Each sub-package has the same shape: `__init__.py` declares PLUGIN, `support.py` says which
nodes it takes, `compile.py` builds a subgraph, `device.py` finds and runs devices.
Profiles of concrete boards live in `profiles/*.toml`.
"""

"""MEFT (work in progress on branch meft-wip): see adapter.py; the strategy, offloading and CPU AdamW come next."""

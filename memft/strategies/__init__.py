"""Built-in strategies. Importing this package registers them (see `memft.registry`).

A strategy's package keeps its registration, params, checks and class attributes free of torch (type hints under
`TYPE_CHECKING`) and imports torch and its implementation modules in the methods that run on a model: validating a
recipe (`memft validate`, `memft schema`) imports none of them (tests/test_imports.py).
"""

from memft.strategies import full, lcsb, lora, meft, revffn, tokentune  # noqa: F401

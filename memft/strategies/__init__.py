"""Built-in strategies. Importing this package registers them (see `memft.registry`)."""

from memft.strategies import full, lcsb, lora, meft, revffn, tokentune  # noqa: F401

"""`memft eval`: score a model the way lm-evaluation-harness does (MMLU few-shot; GLUE to come)."""

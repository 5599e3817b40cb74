"""`memft profile`: a recipe's memory, predicted from its model's config before anything runs.

`predict.profile(recipe)` builds the model on the meta device with the recipe's strategies (exact
weights, gradients and optimizer state) and fits the activations from small twins run on the CPU
(`activations.py`); `advice.py` ranks changes that make a recipe fit a memory budget.
"""

from memft.profile.predict import Profile, profile

__all__ = ["Profile", "profile"]

"""Robot-learning toolkit: swappable encoders and policies as Lightning modules, under Hydra."""

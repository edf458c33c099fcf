"""What exists only for recipes: the prologue every recipe shares (recipe.py `begin`, run directories, results
tables), the named pipelines the paper-settings recipes configure (edm_cm.py for EDM teachers, imagenet64.py and
imagenet512.py on EDM2 networks, latent_vgg.py, digits.py, gmm.py), EDM2's published settings (edm2_presets.py),
the encode commands that build latent and caption datasets, random-weight stand-ins for --smoke runs, and the demo.

Nothing in the engine's core imports this package; recipes, bench/ and tests/ do (tests/test_architecture.py).
"""

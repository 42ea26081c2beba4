"""The synthetic corpus generator's parts (the public entry points are in :mod:`redheart.data.generate`).

* ``vocab.py`` — Korean particles, names, people and groups, times, places, fillers: the word lists.
* ``actions.py`` — actions, events and outcomes with their hedonic profiles and emotions.
* ``text.py`` — rendering the drawn parts into an English or Korean text.
* ``labels.py`` — judgment, emotions and Bentham values derived from the same draws, label dropout.
* ``scenario.py`` — drawing one scenario (the fixed order of rng calls) and a whole corpus.
"""

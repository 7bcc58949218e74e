"""Story matching: one story per event, across partners and languages.

One module per job, in the order an item meets them:

- ``features``: what an item carries (the evidence in its text, its embedding),
  computed once and stored;
- ``encoder``: the sentence encoder behind one small interface;
- ``kinds``: items that are a partner's own publication (a newsletter issue);
- ``score``: the pair score of two items and the rules above it;
- ``cluster``: joining a cycle's new items to the stories of the window;
- ``matcher``: what the live pipeline brings (the config's corrections, the loaded
  encoder and model);
- ``split``: taking an item out of a wrong story, for good;
- ``evaluate`` and ``benchmark``: measuring all of it on labelled sets, through the
  same path production runs.

The package imports nothing itself, so reading one module does not load the encoder's
dependencies.
"""

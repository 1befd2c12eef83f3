"""tmass: leak-free T-MASS text-video retrieval on precomputed CLIP features.

The stages live in their own top-level folders and install as sub-packages:
``tmass.extract`` (videos -> CLIP features), ``tmass.features`` (the shard format, the
only contract between stages), ``tmass.train`` (heads on cached features) and
``tmass.evaluate`` (leak-free retrieval metrics). This package only holds the version
and the ``tmass`` command line that gathers the stages' commands.
"""

__version__ = "0.1.0"

"""Videos to frozen CLIP features: decode and sample (:mod:`tmass.extract.video`), encode
with open_clip (:mod:`tmass.extract.encoder`), dataset adapters and the demo set
(:mod:`tmass.extract.datasets`, :mod:`tmass.extract.demo`), and the per-partition runner with
its single-process and dask distributors (:mod:`tmass.extract.runner`)."""

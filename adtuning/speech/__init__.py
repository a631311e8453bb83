"""Speech side: upstreams, featurizer, SUPERB tasks, corpora, metrics."""

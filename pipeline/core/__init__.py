"""Layer 2, core: manifest, images, metrics, schemas, feature cache, configuration. No Beam."""

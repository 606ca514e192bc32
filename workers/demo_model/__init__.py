"""darkroom's built-in demo model: procedural shapes, a tiny SD pipeline trained on them, and a scorer."""


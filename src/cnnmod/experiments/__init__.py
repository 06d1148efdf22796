"""The paper's study and its presets, built from library calls."""

"""The math every step shares, with no files: the model's graph and observation points, the observation pass,
channel groups and gates, score calibration, accuracy measures and run-time cost."""

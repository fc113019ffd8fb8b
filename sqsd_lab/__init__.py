"""The lab around the sqsd_callback library: the ``sqsd`` command (demo, directions, score, report), the embedded
default model and data, direction adapters built from data, refusal measures, plots and reports, the experiments,
and tiny random models for tests and benchmarks. Installed with the ``app`` extra."""
